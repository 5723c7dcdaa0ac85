"""The whole pipeline from one config: prepare → foundation → Teacher → [caption → adapt] → synthesis → label → Students.

The stages in brackets are those the generation method needs (its module declares captions, LoRAs,
embeddings, a generator, a step after synthesis), walked by ``stages/graph.py``, the one place that
declares the generation stages and their order. Every stage writes under ``<output.root>/<stage>/<stage hash>/`` and is
skipped when its output already exists for the same hash, so rerunning does no duplicate work. ``validate_inputs``
checks everything that can be checked cheaply (config, dataset files, model paths) before Ray
starts or any model is built.
"""

from __future__ import annotations

import json
import os
import time

from synthset import storage
from synthset.config import Config, config_hash
from synthset.stages.common import output_root
from synthset.stages.foundation import check_foundation_path
from synthset.stages.graph import generation_stages, run_generation, run_method_stages, stage_dirs

__all__ = ["validate_inputs", "describe", "run_pipeline", "run_generation", "run_method_stages", "format_summary"]


def validate_inputs(cfg: Config, prepare: bool = True) -> list[str]:
    """Fail fast on a missing dataset or model, then run the prepare stage; return the class names.

    The model path is checked first (seconds); then the source is listed and split without decoding
    (``stages/prepare.py``: a missing folder, an empty class, a bad label or split size fails there,
    before any stage directory is written) unless this data was prepared already, and what the
    method needs of the private split is checked on those lists. With ``prepare`` the prepare stage
    then runs (in parallel when Ray is running); ``run_pipeline`` lists first, starts Ray, then
    prepares.
    """
    from synthset.stages.prepare import load_splits, plan, prepare_dir, run_prepare

    path = cfg.foundation.path
    if path is not None:
        check_foundation_path(path)
    if path is None and cfg.data.splits.public == 0:
        raise ValueError("data.splits.public: 0 public images, but foundation.path is not set (nothing to pretrain on)")
    generation_stages(cfg)  # the method's stages exist (a config error, before reading any data)
    if prepare_dir(cfg).is_complete():
        if prepare:
            run_prepare(cfg)  # says that the prepared data is reused
        splits = load_splits(cfg)
        _check_method(cfg, splits.private.labels, splits.class_names)
        return splits.class_names
    quick = plan(cfg, check_images=False)
    _check_method(cfg, quick.splits["private"].labels, quick.class_names)
    if prepare:
        run_prepare(cfg, prepared_plan=quick if cfg.data.on_bad_image == "error" else None)
    return quick.class_names


def _check_method(cfg: Config, private_labels, class_names: list[str]) -> None:
    """What the generation method needs from the private split, checked before any work."""
    from synthset.methods import get_method
    from synthset.stages.adapt import check_shots

    method = get_method(cfg.synthesis.method)
    generation_stages(cfg)  # every stage it needs exists
    if method.lora is not None:
        check_shots(cfg.adapt.shots_per_class, private_labels, class_names)
    if method.check is not None:
        method.check(cfg, private_labels, class_names)


def describe(cfg: Config) -> dict:
    """The resolved config with the hash and output directory of every stage (for --dry-run)."""
    from synthset.stages.classifier import student_dir, teacher_dir
    from synthset.stages.foundation import foundation_dir
    from synthset.stages.synthesize import label_dir, synthesis_dir

    dirs = {"foundation": foundation_dir(cfg), "teacher": teacher_dir(cfg),
            **stage_dirs(cfg),
            "synthesis": synthesis_dir(cfg),
            "label": label_dir(cfg), **{f"student-{l}": student_dir(cfg, l) for l in cfg.student.labels}}
    from synthset.stages.evaluate import evaluate_dir, replication_dir

    if cfg.replication.enabled:
        dirs["replication"] = replication_dir(cfg)
    if cfg.evaluate.enabled:
        dirs["evaluate"] = evaluate_dir(cfg)
    from synthset.stages.common import completion

    from synthset.stages.prepare import prepare_dir

    prepare = prepare_dir(cfg)  # the first stage, listed apart: ``stages`` lists what is trained and generated
    done = completion([prepare, *dirs.values()])  # None when the store cannot be reached (offline dry run)
    prepared, done = done[0], done[1:]
    return {"config_hash": config_hash(cfg.to_dict()),
            "prepare": {"hash": prepare.hash, "dir": prepare.uri, "complete": prepared},
            "stages": {k: {"hash": d.hash, "dir": d.uri, "complete": c} for (k, d), c in zip(dirs.items(), done)}}


def run_pipeline(cfg: Config, resume: bool = True) -> dict:
    from synthset.stages.classifier import run_student, run_teacher
    from synthset.stages.common import init_ray
    from synthset.stages.foundation import run_foundation
    from synthset.stages.synthesize import dataset_sample_grid, run_label
    from synthset.tracking import Tracker

    t0 = time.time()
    # Lists the source, then prepares it: bad data fails before Ray or MLflow start (a folder large enough to
    # be prepared by Ray tasks starts Ray for them: its decoding errors come after that).
    class_names = validate_inputs(cfg)
    root = output_root(cfg)
    storage.makedirs(root)
    init_ray(cfg)
    tracker = Tracker(cfg)
    with tracker.pipeline_run("pipeline"):
        foundation = run_foundation(cfg, tracker)
        teacher = run_teacher(cfg, tracker)
        synthesis = run_generation(cfg, class_names, resume, tracker)
        label = run_label(cfg, synthesis["dataset"], teacher["model"], resume, tracker)
        from synthset.stages.evaluate import run_evaluate, student_training_set

        train_set = student_training_set(cfg, label["dataset"], resume, tracker)  # replication gate (flag/drop)
        students = {labels: run_student(cfg, train_set, labels, tracker) for labels in cfg.student.labels}
        evaluation = run_evaluate(cfg, resume, tracker) if cfg.evaluate.enabled else {}
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
            "foundation_model": foundation.get("model"), "sample_grid": grid, "method": cfg.synthesis.method,
            "adapt": synthesis.get("adapt"),
            "confusion_matrices": [os.path.join(s["model"], "confusion_matrix.png") for s in students.values()],
            "mlflow_uri": tracker.uri, "seconds": time.time() - t0,
            **({"report": evaluation["report"], **{k: v for k, v in evaluation.items() if k.startswith(
                ("gen_", "replication_", "lira_"))}} if evaluation else {}),
            "stage_seconds": {name: round(st.get("seconds", 0.0), 1) for name, st in
                              [("foundation", foundation), ("teacher", teacher),
                               *[(name, synthesis[name]) for name in generation_stages(cfg) if synthesis.get(name)],
                               ("synthesis", synthesis),
                               ("label", label), *[(f"student-{k}", v) for k, v in students.items()],
                               ("evaluate", evaluation)]},
        }
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, float) or isinstance(v, int)})
        tracker.log_stage("evaluate", cfg, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))},
                          artifacts=[grid, storage.join(label["dataset"], "manifest.json")])
    baseline = baseline_students(cfg)
    if baseline:
        summary["baseline"] = baseline
    storage.write_json(storage.join(root, f"summary-{summary['config_hash']}.json"), summary)
    return summary


BASELINE_METHOD = "class_prompt"


def baseline_config(cfg: Config) -> Config:
    """``cfg`` with ClassPrompt generation: what an adapted method's gain is measured against."""
    d = cfg.to_dict()
    d["synthesis"] = {**d["synthesis"], "method": BASELINE_METHOD}
    return Config.model_validate(d)


def baseline_students(cfg: Config) -> dict | None:
    """The ClassPrompt Students of the same data, foundation, Teacher and cardinality, if they were trained.

    Read from their stage directories (nothing is run): ``{"method", "command", "student_soft_accuracy", …}``,
    with ``None`` for a Student not trained yet; ``None`` when ``cfg`` is ClassPrompt itself.
    """
    from synthset.stages.classifier import student_dir

    if cfg.synthesis.method == BASELINE_METHOD:
        return None
    base = baseline_config(cfg)
    out = {"method": BASELINE_METHOD,
           "command": f"python jobs/pipeline.py --config <this config> --set synthesis.method={BASELINE_METHOD}"}
    for labels in cfg.student.labels:
        stage = student_dir(base, labels)
        out[f"student_{labels}_accuracy"] = stage.summary()["test_accuracy"] if stage.is_complete() else None
    return out


def format_summary(summary: dict) -> str:
    lines = ["", "=== synthset pipeline summary ===",
             f"Teacher accuracy (real test set):        {summary['teacher_accuracy']:.4f}"]
    for key in ("soft", "hard"):
        if f"student_{key}_accuracy" in summary:
            lines.append(f"Student accuracy, {key} labels (CAS):     {summary[f'student_{key}_accuracy']:.4f}")
    baseline = summary.get("baseline")
    if baseline:
        for key in ("soft", "hard"):
            ours, theirs = summary.get(f"student_{key}_accuracy"), baseline.get(f"student_{key}_accuracy")
            if ours is not None and theirs is not None:
                lines.append(f"  vs {baseline['method']} ({key} labels):        {theirs:.4f}  "
                             f"(gain {100 * (ours - theirs):+.1f} points, {summary['method']})")
        if all(baseline.get(f"student_{k}_accuracy") is None for k in ("soft", "hard")):
            lines.append(f"  {baseline['method']} baseline not trained yet: {baseline['command']}")
    lines += [f"Teacher agrees with the prompted class:  {summary['teacher_agreement_on_synthetic']:.1%}",
              f"Images: {summary['images']} ({summary['images_generated_now']} generated this run"
              + (f", {summary['images_per_s']:.1f} images/s)" if summary['images_generated_now'] else ")"),
              f"Shards:        {summary['shards']}",
              f"Labelled:      {summary['labelled_shards']}",
              f"Sample grid:   {summary['sample_grid']}",
              f"Confusion:     {', '.join(summary['confusion_matrices'])}",
              f"MLflow store:  {summary['mlflow_uri']}"]
    if summary.get("report"):
        lines.insert(-1, f"Report:        {summary['report']}")
        if "replication_rate" in summary:
            lines.insert(-1, f"Replication:   {summary['replication_copies']} near-copies "
                             f"({summary['replication_rate']:.2%}) of private images")
    if summary.get("mlflow_uri"):
        lines.append(f"Open the UI:   .venv/bin/mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    lines.append(f"Total time:    {summary['seconds']:.0f}s (stages, when run: "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items()) + ")")
    return "\n".join(lines)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1))
