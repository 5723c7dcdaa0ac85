"""The whole pipeline from one config: foundation → Teacher → synthesis → label → Students.

Every stage writes under ``<output.root>/<stage>/<stage hash>/`` and is skipped when its output
already exists for the same hash, so rerunning does no duplicate work. ``validate_inputs``
checks everything that can be checked cheaply (config, dataset files, model paths) before Ray
starts or any model is built.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from synthset import storage
from synthset.config import Config, config_hash
from synthset.stages.common import output_root


def validate_inputs(cfg: Config) -> list[str]:
    """Fail fast (seconds) on a missing dataset or model; return the class names."""
    from synthset.data.splits import load_source, split_indices

    path = cfg.foundation.path
    # A local directory must hold a diffusers pipeline; anything else is taken as a hub id.
    if path is not None and (Path(path).expanduser().exists() or path.startswith(("/", ".", "~"))):
        index = Path(path).expanduser() / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"foundation.path: {index} not found (expected a diffusers pipeline directory)")
    train, _ = load_source(cfg.data)
    split_indices(len(train), cfg.data.splits.public, cfg.data.splits.private, cfg.data.splits.seed)
    if path is None and cfg.data.splits.public == 0:
        raise ValueError("data.splits.public: 0 public images, but foundation.path is not set (nothing to pretrain on)")
    return train.class_names


def describe(cfg: Config) -> dict:
    """The resolved config with the hash and output directory of every stage (for --dry-run)."""
    from synthset.stages.classifier import student_dir, teacher_dir
    from synthset.stages.foundation import foundation_dir
    from synthset.stages.synthesize import label_dir, synthesis_dir

    dirs = {"foundation": foundation_dir(cfg), "teacher": teacher_dir(cfg), "synthesis": synthesis_dir(cfg),
            "label": label_dir(cfg), **{f"student-{l}": student_dir(cfg, l) for l in cfg.student.labels}}
    return {"config_hash": config_hash(cfg.to_dict()),
            "stages": {k: {"hash": d.hash, "dir": d.uri, "complete": d.is_complete()} for k, d in dirs.items()}}


def run_pipeline(cfg: Config, resume: bool = True) -> dict:
    from synthset.stages.classifier import run_student, run_teacher
    from synthset.stages.common import init_ray
    from synthset.stages.foundation import foundation_model_path, run_foundation
    from synthset.stages.synthesize import dataset_sample_grid, run_label, run_synthesis
    from synthset.tracking import Tracker

    t0 = time.time()
    class_names = validate_inputs(cfg)
    root = output_root(cfg)
    storage.makedirs(root)
    init_ray(cfg)
    tracker = Tracker(cfg)
    with tracker.pipeline_run("pipeline"):
        foundation = run_foundation(cfg, tracker)
        teacher = run_teacher(cfg, tracker)
        synthesis = run_synthesis(cfg, foundation_model_path(cfg), class_names, resume, tracker)
        label = run_label(cfg, synthesis["dataset"], teacher["model"], resume, tracker)
        students = {labels: run_student(cfg, label["dataset"], labels, tracker) for labels in cfg.student.labels}
        grid = storage.join(root, f"synthetic_samples-{synthesis['stage_hash']}.png")
        if storage.is_local(grid):
            dataset_sample_grid(label["dataset"], grid)
        summary = {
            "config_hash": config_hash(cfg.to_dict()),
            "teacher_accuracy": teacher["test_accuracy"],
            **{f"student_{k}_accuracy": s["test_accuracy"] for k, s in students.items()},
            "teacher_agreement_on_synthetic": label["teacher_agreement"],
            "images": synthesis["num_samples"], "images_generated_now": 0 if synthesis.get("reused") else synthesis.get("generated_now", 0),
            "images_per_s": synthesis.get("images_per_s", 0.0),
            "shards": synthesis["dataset"], "labelled_shards": label["dataset"],
            "foundation_model": foundation.get("model"), "sample_grid": grid,
            "confusion_matrices": [os.path.join(s["model"], "confusion_matrix.png") for s in students.values()],
            "mlflow_uri": tracker.uri, "seconds": time.time() - t0,
            "stage_seconds": {name: round(st.get("seconds", 0.0), 1) for name, st in
                              [("foundation", foundation), ("teacher", teacher), ("synthesis", synthesis),
                               ("label", label), *[(f"student-{k}", v) for k, v in students.items()]]},
        }
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, float) or isinstance(v, int)})
        tracker.log_stage("evaluate", cfg, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))},
                          artifacts=[grid, storage.join(label["dataset"], "manifest.json")])
    storage.write_json(storage.join(root, f"summary-{summary['config_hash']}.json"), summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = ["", "=== synthset pipeline summary ===",
             f"Teacher accuracy (real test set):        {summary['teacher_accuracy']:.4f}"]
    for key in ("soft", "hard"):
        if f"student_{key}_accuracy" in summary:
            lines.append(f"Student accuracy, {key} labels (CAS):     {summary[f'student_{key}_accuracy']:.4f}")
    lines += [f"Teacher agrees with the prompted class:  {summary['teacher_agreement_on_synthetic']:.1%}",
              f"Images: {summary['images']} ({summary['images_generated_now']} generated this run"
              + (f", {summary['images_per_s']:.1f} images/s)" if summary['images_generated_now'] else ")"),
              f"Shards:        {summary['shards']}",
              f"Labelled:      {summary['labelled_shards']}",
              f"Sample grid:   {summary['sample_grid']}",
              f"Confusion:     {', '.join(summary['confusion_matrices'])}",
              f"MLflow store:  {summary['mlflow_uri']}"]
    if summary.get("mlflow_uri"):
        lines.append(f"Open the UI:   .venv/bin/mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    lines.append(f"Total time:    {summary['seconds']:.0f}s (stages, when run: "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items()) + ")")
    return "\n".join(lines)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1))
