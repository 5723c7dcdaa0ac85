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
from synthset.models.encoders import feature_extractor
from synthset.stages.common import StageDir


def replication_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "replication")


def evaluate_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "evaluate")


def _unit_batch(samples: list[dict], size: int, channels: int):
    """Shard samples → float (N, channels, size, size) in [-1, 1] (generators may write another size or mode)."""
    import torch

    from synthset.data.shards import image_to_tensor

    if not samples:
        return torch.zeros(0, channels, size, size)
    return torch.stack([image_to_tensor(s["image"], size, channels) for s in samples])


QUERY_BATCH = 256  # synthetic images the gate checks at once (its queries' tiles are in memory together)
AUDIT_FIELDS = ["key", "real_index", "metric", "score", "is_copy"]


def _load_chunk(part):
    """A reference chunk of the gate: a ``.npy`` file (no Ray; memory-mapped, so that the index's re-ranking
    reads only the rows it needs) or a Ray object ref."""
    if isinstance(part, str):
        return np.load(part, mmap_mode="r", allow_pickle=False)
    import ray

    return ray.get(part)


class _ChunkStore:
    """Where the gate's private images wait while the stage runs: Ray's object store (put once, read by every
    pool actor on any node) or, without Ray, ``.npy`` files in a temporary directory. Never in one process."""

    def __init__(self):
        import tempfile

        import ray

        self.ray = ray.is_initialized()
        self.dir = None if self.ray else tempfile.mkdtemp(prefix="synthset-gate-")
        self.parts, self.sizes = [], []

    def put(self, array: np.ndarray) -> None:
        if self.ray:
            import ray

            part = ray.put(np.ascontiguousarray(array))
        else:
            part = os.path.join(self.dir, f"chunk-{len(self.parts):06d}.npy")
            np.save(part, np.ascontiguousarray(array), allow_pickle=False)
        self.parts.append(part)
        self.sizes.append(len(array))

    def chunks(self):
        from synthset.eval.replication import Chunks

        return Chunks(self.parts, self.sizes, _load_chunk)

    def close(self) -> None:
        import shutil

        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _index_params(cfg: Config):
    """The ``replication.index_*`` settings as the gate takes them (the training sample seeded like the calibration)."""
    from synthset.eval.replication_index import IndexParams

    rep = cfg.replication
    return IndexParams(rep.index_nlist, rep.index_nprobe, rep.index_candidates, rep.index_grid, rep.index_min_private,
                       cfg.data.splits.seed, rep.index_distance)


def _gate_feature_fn(cfg: Config, device: str = "cpu"):
    rep = cfg.replication
    if rep.metric != "cosine":
        return None
    teacher = None
    if rep.features == "teacher":
        from synthset.models.classifiers import load_classifier
        from synthset.stages.classifier import teacher_dir

        teacher = load_classifier(storage.materialize(teacher_dir(cfg).summary()["model"]), device)
    return feature_extractor(rep.features, teacher, device)


class ShardGate:
    """Shard-pool worker of the replication gate: one synthetic shard per call — its verdicts as an audit part,
    and with ``action: drop`` a copy of the shard without the copies (the kept members' bytes copied).
    ``reference["index"]``: the driver's faiss index as a chunk-store part (None: exact search)."""

    def __init__(self, cfg: dict, reference: dict, threshold: float, source: str, parts_dir: str,
                 dataset: str | None, channels: int):
        from synthset.eval.replication import Chunks, ReplicationGate
        from synthset.eval.replication_index import PrivateIndex

        self.cfg = Config.model_validate(cfg)
        rep = self.cfg.replication
        index = "exact"
        if reference.get("index") is not None:
            index = PrivateIndex.from_array(_load_chunk(reference["index"]), rep.metric, _index_params(self.cfg))
        self.gate = ReplicationGate(Chunks(reference["parts"], reference["sizes"], _load_chunk), rep.metric, rep.tile,
                                    rep.reduce, _gate_feature_fn(self.cfg, rep.device), rep.quantile, threshold,
                                    real_index=np.asarray(reference["real_index"]), device=rep.device, index=index)
        self.source, self.parts_dir, self.dataset, self.channels = source, parts_dir, dataset, channels

    def __call__(self, task: dict) -> dict:
        import csv
        import io

        from synthset.data.shards import decode_image, iter_shard, write_shard

        t0 = time.time()
        path = storage.join(self.source, task["shard"])
        samples = list(iter_shard(path, decode=False))
        size = self.cfg.data.image_size
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=AUDIT_FIELDS)
        copies, score_sum, is_copy = 0, 0.0, []
        for b0 in range(0, len(samples), QUERY_BATCH):
            batch = samples[b0:b0 + QUERY_BATCH]
            images = [{"image": decode_image(s["image"], f"{path}:{s['key']}")} for s in batch]
            result = self.gate.check([s["key"] for s in batch], _unit_batch(images, size, self.channels).numpy())
            writer.writerows(result.rows())
            copies += result.copies
            score_sum += float(result.score.sum())
            is_copy += result.is_copy.tolist()
        stats = {"index": task["index"], "count": len(samples), "copies": copies, "score_sum": score_sum}
        if self.dataset is not None:
            kept = [dict(s, image_bytes=s.pop("image")) for s, c in zip(samples, is_copy) if not c]
            formats = {s["image_ext"] for s in kept} or {"png"}
            stats["shard_stats"] = write_shard(self.dataset, task["index"], kept, formats.pop(),
                                               {"dropped": copies})
        storage.write_bytes(storage.join(self.parts_dir, f"part-{task['index']:06d}.csv"), buf.getvalue().encode())
        return {**stats, "seconds": time.time() - t0}


def run_replication(cfg: Config, labelled_dataset: str, resume: bool = True, tracker=None) -> dict:
    """The replication gate over every image of ``labelled_dataset``; returns the stage summary.

    The private images go once into a chunk store (Ray's object store, or files without Ray), the
    threshold is calibrated on them here, then a pool of gate workers checks the synthetic shards one per
    task (``ShardGate``): memory follows a chunk and a shard, not the private or the synthetic set. With
    ``replication.index: faiss`` (and at least ``index_min_private`` private images) the faiss index is built
    here, once, and goes to the workers through the same store as one uint8 array.

    Summary keys: ``dataset`` (what the Student trains on: the filtered copy with action=drop, else
    ``labelled_dataset``), ``images``, ``copies``, ``copy_fraction``, ``dropped``, ``threshold``,
    ``metric``, ``audit``.
    """
    from synthset.data.shards import read_manifest, write_manifest
    from synthset.eval.replication import ReplicationGate
    from synthset.stages.prepare import load_splits
    from synthset.stages.shard_pool import PoolResources, run_shard_pool

    rep = cfg.replication
    stage = replication_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.uri)
    t0 = time.time()
    stage.begin(cfg)
    private = load_splits(cfg).private
    size, channels = cfg.data.image_size, private.channels
    reference, calibration, index_store = _ChunkStore(), _ChunkStore(), _ChunkStore()
    try:
        for _, images in private.chunks(size=size):  # the private set in the gate's space, a shard at a time
            reference.put(images)
        cal_rows = ReplicationGate.calibration_rows(len(private), rep.calibration_size, cfg.data.splits.seed)
        if rep.threshold is None and rep.metric == "tiled_l2":
            for _, images in private.chunks(cal_rows, size):
                calibration.put(images)
        gate = ReplicationGate(reference.chunks(), rep.metric, rep.tile, rep.reduce, _gate_feature_fn(cfg, rep.device),
                               rep.quantile, rep.threshold, real_index=private.index,
                               calibration_size=rep.calibration_size, seed=cfg.data.splits.seed, device=rep.device,
                               calibration=calibration.chunks() if calibration.parts else None,
                               index=rep.index, index_params=_index_params(cfg))
        if gate.index is not None:
            index_store.put(gate.index.to_array())
        source = read_manifest(labelled_dataset)
        dataset = stage.path("data") if rep.action == "drop" else None
        parts_dir = stage.path("audit")
        if not resume:
            storage.delete_dir_contents(parts_dir)
        done = {int(p.rsplit("part-", 1)[1][:6]) for p in storage.list_files(parts_dir, ".csv")} if resume else set()
        tasks = [{"index": i, "shard": s["shard"]} for i, s in enumerate(source["shards"]) if i not in done]
        worker_kwargs = {"cfg": cfg.to_dict(), "threshold": gate.threshold, "source": labelled_dataset,
                         "parts_dir": parts_dir, "dataset": dataset, "channels": channels,
                         "reference": {"parts": reference.parts, "sizes": reference.sizes,
                                       "real_index": private.index.tolist(),
                                       "index": index_store.parts[0] if index_store.parts else None}}
        run_shard_pool(tasks, ShardGate, worker_kwargs, PoolResources.of(rep.actors), "replication",
                       source["num_samples"], sum(source["shards"][i]["count"] for i in done), tracker)
    finally:
        reference.close()
        calibration.close()
        index_store.close()
    # Every shard's audit part is complete (this run's or an earlier one's): gather the totals from them.
    audit, copies, score_sum, images = stage.path("replication_audit.csv"), 0, 0.0, 0
    parts = [storage.join(parts_dir, f"part-{i:06d}.csv") for i in range(len(source["shards"]))]
    header = (",".join(AUDIT_FIELDS) + "\r\n").encode()
    storage.write_parts(audit, [header, *(storage.read_bytes(p) for p in parts)])
    for part in parts:
        for line in storage.read_bytes(part).decode().splitlines():
            row = line.split(",")
            images += 1
            copies += row[-1] == "True"
            score_sum += float(row[-2])
    counts = {"metric": gate.metric, "threshold": gate.threshold, "images": images, "copies": copies,
              "copy_fraction": copies / images if images else 0.0,
              "score_mean": score_sum / images if images else float("nan"),
              "quantile": rep.quantile if rep.threshold is None else None, "action": rep.action,
              "dropped": copies if rep.action == "drop" else 0, "audit": audit,
              "calibration_images": int(len(getattr(gate, "nn_scores", [])))}
    if getattr(gate, "nn_scores", None) is not None:
        counts["private_nn_score_median"] = float(np.median(gate.nn_scores))
    if gate.index is not None:  # only then: an exact run's replication.json stays as it was
        counts["index"] = gate.index.describe()
    if dataset is not None:
        from synthset.data.shards import completed_shards

        stats = list(completed_shards(dataset).values())
        meta = {k: v for k, v in source.items() if k not in ("schema_version", "shards", "num_samples",
                                                               "totals_per_class", "complete", "written_at")}
        write_manifest(dataset, {**meta, "config_hash": stage.hash, "source": labelled_dataset,
                                 "replication": counts}, stats)
    storage.write_json(stage.path("replication.json"), counts)
    summary = stage.complete({"dataset": dataset or labelled_dataset, **counts, "seconds": time.time() - t0})
    print(f"[replication] {copies} of {images} synthetic images within {gate.threshold:.4f} "
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
    """A seeded sample of ``n`` images of ``dataset``: (images in [-1, 1], classes, Teacher soft labels or None).

    Only the shards holding a sampled image are read, and only the sampled images decoded."""
    from synthset.data.shards import decode_image, iter_shard, read_manifest

    manifest = read_manifest(dataset)
    total = manifest["num_samples"]
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    offsets = np.concatenate([[0], np.cumsum([s["count"] for s in manifest["shards"]])])
    which = np.searchsorted(offsets, chosen, side="right") - 1
    picked = []
    for shard in np.unique(which):
        path = storage.join(dataset, manifest["shards"][shard]["shard"])
        wanted = set((chosen[which == shard] - offsets[shard]).tolist())
        for i, s in enumerate(iter_shard(path, decode=False)):
            if i in wanted:
                picked.append({**s, "image": decode_image(s["image"], f"{path}:{s['key']}")})
    x = _unit_batch(picked, size, channels)
    y = np.array([s["cls"] for s in picked])
    soft = np.stack([s["soft"] for s in picked]) if picked and all("soft" in s for s in picked) else None
    return x, y, soft


def generative_metrics(cfg: Config, dataset: str, teacher) -> dict:
    """FID, KID, PRDC, recognizability and diversity of ``dataset`` vs the private training split."""
    import torch

    from synthset.data.splits import to_unit_tensor
    from synthset.eval.generative import extract_features, generative_report
    from synthset.models.training import predict_proba

    from synthset.stages.prepare import load_splits

    ev = cfg.evaluate
    splits = load_splits(cfg)
    rng = np.random.default_rng([ev.seed, 2])
    real_rows = np.sort(rng.choice(len(splits.private), min(ev.sample_size, len(splits.private)), replace=False))
    x_real = to_unit_tensor(splits.private.read(real_rows, cfg.data.image_size))
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
    from synthset.stages.report import write_report
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
