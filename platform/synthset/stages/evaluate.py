"""Replication gate and evaluation stages: what a synthetic dataset is worth and what it leaks.

``run_replication`` (between labelling and the Student; ``replication`` section) finds, for every
labelled synthetic image, its nearest private training image (``eval/replication.py``: tiled pixel L2
by default, or cosine in an encoder's feature space) with a threshold calibrated on the private
set's own nearest-neighbour distances. It writes ``replication_audit.csv`` (one row per synthetic
image: key, real_index = index into the source's training set as in ``splits.json``, metric,
score, is_copy) and ``replication.json`` (counts); with ``action: drop`` it also writes a copy of the
dataset without the copies (``data/``, shards + ``manifest.json`` whose ``replication`` field holds the
counts), and that copy is what the Student trains on (``student_training_set``). Output:
``<output.root>/replication/<hash>/``, ``_SUCCESS.json`` last; a rerun redoes only unfinished work.

``run_evaluate`` (``evaluate`` section, after the Students) gathers Teacher and Student test
accuracy (CAS), generative metrics of the labelled synthetic dataset against the private training
images in a configurable feature space (FID, KID, precision/recall/density/coverage, LoFT's
recognizability and diversity; the Teacher's penultimate features by default), the replication
statistics, LiRA for the Teacher and every Student when ``privacy.enabled`` (``stages/privacy.py``),
a per-class sample grid, and writes ``metrics.json`` and ``report.md`` (+ PNGs) under
``<output.root>/evaluate/<hash>/``, logged to MLflow as artifacts. ``jobs/evaluate.py`` runs it.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from synthset import storage
from synthset.config import Config
from synthset.stages.common import StageDir


def replication_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "replication")


def evaluate_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "evaluate")


def feature_extractor(spec: str, teacher=None, device: str = "cpu") -> Callable:
    """images (B, C, H, W) in [-1, 1] → features (B, F): the Teacher's ``embed`` or a transformers model.

    ``spec``: "teacher", or a hub id / local directory of a transformers image model (DINOv2, CLIP,
    ViT, ...): images are brought to RGB at the model's ``image_size`` with ImageNet normalisation;
    the features are ``get_image_features`` when the model has it, else the pooled output, else the
    CLS token.
    """
    import torch
    import torch.nn.functional as F

    if spec == "teacher":
        if teacher is None:
            raise ValueError("features: 'teacher' needs the Teacher model")
        return teacher.embed
    from transformers import AutoModel

    model = AutoModel.from_pretrained(spec).to(device).eval()
    vision = getattr(model.config, "vision_config", model.config)
    size = getattr(vision, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def embed(x):
        x = (x.to(device) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - mean) / std
        if hasattr(model, "get_image_features"):
            return model.get_image_features(pixel_values=x)
        out = model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).flatten(1)

    return embed


def _shard_samples(dataset: str):
    from synthset.data.shards import iter_shard, read_manifest

    for entry in read_manifest(dataset)["shards"]:
        yield entry, list(iter_shard(storage.join(dataset, entry["shard"])))


def _unit_batch(samples: list[dict], size: int, channels: int):
    """Shard samples → float (N, channels, size, size) in [-1, 1] (generators may write another size or mode)."""
    import torch

    from synthset.data.shards import image_to_tensor

    if not samples:
        return torch.zeros(0, channels, size, size)
    return torch.stack([image_to_tensor(s["image"], size, channels) for s in samples])


def run_replication(cfg: Config, labelled_dataset: str, resume: bool = True, tracker=None) -> dict:
    """The replication gate over every image of ``labelled_dataset``; returns the stage summary.

    Summary keys: ``dataset`` (what the Student trains on: the filtered copy with action=drop, else
    ``labelled_dataset``), ``images``, ``copies``, ``copy_fraction``, ``dropped``, ``threshold``,
    ``metric``, ``audit``.
    """
    from synthset.data.shards import completed_shards, read_manifest, write_manifest, write_shard
    from synthset.data.splits import fit_images
    from synthset.eval.replication import ReplicationGate, ReplicationResult, write_audit

    rep = cfg.replication
    stage = replication_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.uri)
    t0 = time.time()
    stage.begin(cfg)
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    size, channels = cfg.data.image_size, splits.private.channels
    real = fit_images(splits.private.images, size)
    feature_fn = None
    if rep.metric == "cosine":
        teacher = None
        if rep.features == "teacher":
            from synthset.models.classifiers import load_classifier
            from synthset.stages.classifier import teacher_dir

            teacher = load_classifier(storage.materialize(teacher_dir(cfg).summary()["model"]))
        feature_fn = feature_extractor(rep.features, teacher, rep.device)
    gate = ReplicationGate(real, rep.metric, rep.tile, rep.reduce, feature_fn, rep.quantile, rep.threshold,
                           real_index=splits.private_index, calibration_size=rep.calibration_size,
                           seed=cfg.data.splits.seed, device=rep.device)
    parts, shards = [], []
    for entry, samples in _shard_samples(labelled_dataset):
        result = gate.check([s["key"] for s in samples], _unit_batch(samples, size, channels).numpy())
        parts.append(result)
        shards.append((entry, samples, result.is_copy))
    keys = [k for p in parts for k in p.keys]
    cat = lambda name, dtype: np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, dtype)
    result = ReplicationResult(gate.metric, gate.threshold, keys, cat("real_index", np.int64),
                               cat("score", np.float32), cat("is_copy", bool))
    audit = stage.path("replication_audit.csv")
    write_audit(result, audit)
    counts = {**result.summary(), "quantile": rep.quantile if rep.threshold is None else None, "action": rep.action, "dropped": result.copies if rep.action == "drop" else 0,
              "audit": audit, "calibration_images": int(len(getattr(gate, "nn_scores", [])))}
    if getattr(gate, "nn_scores", None) is not None:
        counts["private_nn_score_median"] = float(np.median(gate.nn_scores))
    dataset = labelled_dataset
    if rep.action == "drop":
        dataset = stage.path("data")
        done = completed_shards(dataset) if resume else {}
        stats = []
        for i, (entry, samples, is_copy) in enumerate(shards):
            kept = [s for s, c in zip(samples, is_copy) if not c]
            if i in done and done[i]["count"] == len(kept):
                stats.append(done[i])
                continue
            stats.append(write_shard(dataset, i, kept, "png", {"dropped": int(is_copy.sum())}))
        src = read_manifest(labelled_dataset)
        meta = {k: v for k, v in src.items() if k not in ("schema_version", "shards", "num_samples",
                                                            "totals_per_class", "complete", "written_at")}
        write_manifest(dataset, {**meta, "config_hash": stage.hash, "source": labelled_dataset,
                                 "replication": counts}, stats)
    storage.write_json(stage.path("replication.json"), counts)
    summary = stage.complete({"dataset": dataset, **counts, "seconds": time.time() - t0})
    print(f"[replication] {result.copies} of {len(keys)} synthetic images within {gate.threshold:.4f} "
          f"({rep.metric}) of a private image: {'dropped' if rep.action == 'drop' else 'flagged'} "
          f"({time.time() - t0:.0f}s)")
    if tracker is not None:
        tracker.log_stage("replication", cfg, metrics={k: v for k, v in counts.items() if isinstance(v, (int, float))},
                          params=rep.model_dump(mode="json"),
                          artifacts=[storage.local_path(audit)] if storage.is_local(audit) else [])
    return summary


def student_training_set(cfg: Config, labelled_dataset: str, resume: bool = True, tracker=None) -> str:
    """The dataset a Student trains on: the gated copy (action=drop), else the labelled dataset.

    Runs the gate when enabled (so the audit exists before any Student trains).
    """
    if not cfg.replication.enabled:
        return labelled_dataset
    return run_replication(cfg, labelled_dataset, resume, tracker)["dataset"]


def _sample_dataset(dataset: str, n: int, seed: int, size: int, channels: int):
    """A seeded sample of ``n`` images of ``dataset``: (images in [-1, 1], classes, Teacher soft labels or None)."""
    import torch

    from synthset.data.shards import read_manifest

    total = read_manifest(dataset)["num_samples"]
    chosen = set(np.random.default_rng(seed).choice(total, min(n, total), replace=False).tolist())
    picked, i = [], 0
    for _, samples in _shard_samples(dataset):
        for s in samples:
            if i in chosen:
                picked.append(s)
            i += 1
    x = _unit_batch(picked, size, channels)
    y = np.array([s["cls"] for s in picked])
    soft = np.stack([s["soft"] for s in picked]) if picked and all("soft" in s for s in picked) else None
    return x, y, soft


def generative_metrics(cfg: Config, dataset: str, teacher) -> dict:
    """FID, KID, PRDC, recognizability and diversity of ``dataset`` vs the private training split."""
    import torch

    from synthset.data.splits import fit_images, to_unit_tensor
    from synthset.eval.generative import extract_features, generative_report
    from synthset.models.training import predict_proba

    from synthset.stages.prepare import load_splits

    ev = cfg.evaluate
    splits = load_splits(cfg)
    rng = np.random.default_rng([ev.seed, 2])
    real_rows = np.sort(rng.choice(len(splits.private), min(ev.sample_size, len(splits.private)), replace=False))
    x_real = to_unit_tensor(fit_images(splits.private.images[real_rows], cfg.data.image_size))
    x_fake, y_fake, soft = _sample_dataset(dataset, ev.sample_size, ev.seed, cfg.data.image_size,
                                             splits.private.channels)
    fn = feature_extractor(ev.features, teacher)
    real_f = extract_features(fn, x_real)
    fake_f = extract_features(fn, x_fake)
    predicted = soft if soft is not None else predict_proba(teacher, x_fake)
    out = generative_report(real_f, fake_f, y_fake, predicted, len(splits.class_names), ev.kid_subsets,
                            ev.kid_subset_size, min(ev.prdc_k, len(fake_f) - 1, len(real_f) - 1), ev.seed)
    from synthset.eval.generative import diversity

    out["diversity_private"] = diversity(real_f, splits.private.labels[real_rows], len(splits.class_names))["mean"]
    out.update({"feature_space": ev.features, "real_images": int(len(real_f)), "synthetic_images": int(len(fake_f))})
    return out


def run_evaluate(cfg: Config, resume: bool = True, tracker=None) -> dict:
    """Evaluate the config's synthetic dataset, Teacher and Students; write metrics.json and report.md.

    Needs the Teacher, the labelled dataset and the Students of this config (run the pipeline first).
    Ray must be initialised when ``privacy.enabled`` (shadows are Ray tasks).
    """
    from synthset.eval.report import write_report
    from synthset.models.classifiers import load_classifier
    from synthset.stages.classifier import student_dir, teacher_dir
    from synthset.stages.synthesize import dataset_sample_grid, label_dir

    stage = evaluate_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.uri)
    needed = {"teacher": teacher_dir(cfg), "label": label_dir(cfg),
              **{f"student-{l}": student_dir(cfg, l) for l in cfg.student.labels}}
    missing = [f"{k} ({d.uri})" for k, d in needed.items() if not d.is_complete()]
    if missing:
        raise FileNotFoundError(f"evaluate: not yet trained for this config: {', '.join(missing)}; run jobs/pipeline.py")
    t0 = time.time()
    stage.begin(cfg)
    teacher, label = needed["teacher"].summary(), needed["label"].summary()
    students = {l: needed[f"student-{l}"].summary() for l in cfg.student.labels}
    labelled = label["dataset"]
    replication = run_replication(cfg, labelled, resume, tracker) if cfg.replication.enabled else None
    train_set = replication["dataset"] if replication else labelled
    teacher_model = load_classifier(storage.materialize(teacher["model"]))
    metrics = {"config_hash": stage.hash, "run": cfg.run.name, "method": cfg.synthesis.method,
               "private_images": None, "synthetic_images": label["num_samples"],
               "student_training_images": None,
               "teacher_accuracy": teacher["test_accuracy"],
               **{f"student_{l}_accuracy": s["test_accuracy"] for l, s in students.items()},
               "teacher_agreement_on_synthetic": label["teacher_agreement"],
               "per_class": {"teacher_agreement": label.get("teacher_agreement_per_class", {})}}
    from synthset.data.shards import read_manifest
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    metrics["private_images"] = len(splits.private)
    metrics["holdout_images"] = 0 if splits.holdout is None else len(splits.holdout)
    metrics["cardinality"] = label["num_samples"] / len(splits.private)
    metrics["student_training_images"] = read_manifest(train_set)["num_samples"]
    metrics["totals_per_class"] = {splits.class_names[int(c)]: n
                                   for c, n in read_manifest(labelled)["totals_per_class"].items()}
    print("[evaluate] generative metrics")
    metrics["generative"] = generative_metrics(cfg, labelled, teacher_model)
    if replication:
        metrics["replication"] = {k: replication.get(k) for k in ("metric", "threshold", "quantile", "images", "copies",
                                                                   "copy_fraction", "dropped", "action", "audit")}
    files = {}
    grid = stage.path("samples_per_class.png")
    if storage.is_local(grid):
        dataset_sample_grid(labelled, storage.local_path(grid), cfg.evaluate.grid_per_class)
        files["samples"] = grid
    if cfg.privacy.enabled:
        if cfg.data.splits.holdout > 0:
            targets = {"teacher": {"model": teacher["model"], "recipe": cfg.teacher},
                       **{f"student-{l}": {"model": s["model"], "recipe": cfg.student, "labels": l,
                                           "dataset": train_set} for l, s in students.items()}}
            from synthset.stages.privacy import run_lira

            metrics["lira"] = run_lira(cfg, targets, stage.uri)
            files["roc"], files["roc_offline"] = stage.path("roc_loglog.png"), stage.path("roc_loglog_offline.png")
        else:  # no known non-members of the real Teacher: the leave-one-out evaluation of its recipe
            from synthset.stages.privacy import run_privacy

            loo = run_privacy(cfg)
            metrics["lira_leave_one_out"] = storage.read_json(loo["metrics"])
            files["roc"] = loo["roc_plot"]
    storage.write_json(stage.path("metrics.json"), metrics)
    report = stage.path("report.md")
    write_report(metrics, report, {k: os.path.basename(v) if v.startswith(stage.uri) else v for k, v in files.items()})
    flat = flat_metrics(metrics)
    summary = stage.complete({"metrics": stage.path("metrics.json"), "report": report, "seconds": time.time() - t0,
                              **flat})
    print(f"[evaluate] report {report} ({time.time() - t0:.0f}s)")
    if tracker is not None:
        arts = [report, stage.path("metrics.json"), *files.values()]
        if replication:
            arts.append(replication["audit"])
        tracker.log_stage("evaluate-report", cfg, metrics=flat,
                          artifacts=[storage.local_path(a) for a in arts if storage.is_local(a)])
    return summary


def flat_metrics(metrics: dict) -> dict:
    """The scalar metrics of ``metrics.json`` under MLflow-friendly names (for the summary and tracking)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"gen_{k}": v for k, v in metrics.get("generative", {}).items() if isinstance(v, (int, float))})
    rep = metrics.get("replication")
    if rep:
        out.update({"replication_copies": rep["copies"], "replication_rate": rep["copy_fraction"],
                    "replication_threshold": rep["threshold"]})
    for target, r in metrics.get("lira", {}).get("targets", {}).items():
        name = target.replace("/", "_").replace("-", "_")
        for variant in ("online", "offline", "online_fixed_var", "offline_fixed_var"):
            if variant in r["variants"]:
                for k in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr"):
                    out[f"lira_{name}_{variant}_{k}"] = r["variants"][variant][k]
    return out
