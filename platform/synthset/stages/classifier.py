"""Teacher and Student stages: Ray Train (TorchTrainer) around ``models.training.fit_classifier``.

The Teacher trains on the private split (real images). A Student trains on a labelled synthetic
dataset only: ``labels: soft`` distils the Teacher's probabilities, ``labels: hard`` uses the class
each image was generated for. Both are evaluated on the real test set (for a Student: CAS) with
per-class accuracy and a confusion-matrix plot, and saved as safetensors.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from synthset.config import ClassifierConfig, Config
from synthset import storage
from synthset.stages.common import StageDir


def teacher_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "teacher")


def student_dir(cfg: Config, labels: str) -> StageDir:
    return StageDir.for_config(cfg, "student", extra=labels)


def _train_loop(config: dict) -> None:
    """Runs in each Ray Train worker; rank 0 saves the model and evaluates it."""
    import numpy as np
    import torch

    import ray.train
    from synthset import storage
    from synthset.data.splits import write_splits
    from synthset.eval.classification import classification_report
    from synthset.plots import save_confusion_matrix
    from synthset.models.classifiers import build_classifier, save_classifier
    from synthset.models.training import classifier_batches, fit_classifier, predict_split

    cfg = Config.model_validate(config["cfg"])
    ccfg = ClassifierConfig.model_validate(config["classifier"])
    role, out, labels = config["role"], config["out"], config["labels"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(ccfg.cpus_per_worker)
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    names, size, channels = splits.class_names, cfg.data.image_size, splits.private.channels
    model = build_classifier(ccfg, len(names), in_channels=channels)
    if world > 1:
        model = ray.train.torch.prepare_model(model)
    else:
        model = model.to("cuda" if ccfg.use_gpu and torch.cuda.is_available() else "cpu")
    data = splits.private if config["dataset"] is None else config["dataset"]  # Teacher: the private split
    batches, steps, n_train = classifier_batches(data, ccfg, size, channels, rank, world)
    t0 = time.time()
    losses = fit_classifier(model, batches, ccfg.epochs, steps, ccfg.lr, ccfg.weight_decay,
                            soft=labels == "soft", temperature=config["temperature"], augment=ccfg.augment,
                            seed=ccfg.seed + rank, name=role,
                            on_epoch=lambda e, m: ray.train.report({"epoch": e, **m}) if world > 1 else None)
    train_seconds = time.time() - t0
    if rank != 0:
        return
    model = getattr(model, "module", model)
    stage_uri, out = out, (out if storage.is_local(out) else tempfile.mkdtemp(prefix=f"{role}-"))
    save_classifier(model, out, ccfg, len(names), channels, {"role": role, "labels": labels})
    if config["dataset"] is None:  # record exactly which real images the Teacher saw
        write_splits(splits, os.path.join(out, "splits.json"))
    probs = predict_split(model, splits.test, size)
    report = classification_report(splits.test.labels, probs, names)
    save_confusion_matrix(np.array(report["confusion_matrix"]), names, os.path.join(out, "confusion_matrix.png"),
                          f"{role}: test accuracy {report['accuracy']:.3f}")
    metrics = {"test_accuracy": report["accuracy"], "train_images": n_train, "train_seconds": train_seconds,
               "final_loss": float(np.mean(losses[-50:])) if losses else float("nan")}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({**metrics, "per_class_accuracy": report["per_class_accuracy"],
                   "confusion_matrix": report["confusion_matrix"]}, f, indent=1)
    storage.upload_dir(out, stage_uri)  # no-op for a local output root
    ray.train.report(metrics)


def _run(cfg: Config, stage: StageDir, ccfg: ClassifierConfig, role: str, labels: str,
         dataset: str | None, temperature: float, tracker) -> dict:
    if stage.is_complete():
        return stage.reuse(stage.uri)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage.begin(cfg)
    out = stage.uri
    what = "the private split" if dataset is None else f"{dataset} ({labels} labels)"
    print(f"[{role}] training {ccfg.arch} for {ccfg.epochs} epochs on {what} with {ccfg.num_workers} worker(s)")
    t0 = time.time()
    TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "role": role,
                           "classifier": ccfg.model_dump(mode="json", include=set(ClassifierConfig.model_fields)),
                           "out": out, "labels": labels, "dataset": dataset, "temperature": temperature},
        scaling_config=ScalingConfig(num_workers=ccfg.num_workers, use_gpu=ccfg.use_gpu,
                                     resources_per_worker={"CPU": ccfg.cpus_per_worker}),
        run_config=RunConfig(name=f"{role}-{stage.hash}", storage_path=stage.path("_ray")),
    ).fit()
    metrics = storage.read_json(stage.path("metrics.json"))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    per_class = {f"acc_{k.replace(' ', '_')}": v for k, v in metrics["per_class_accuracy"].items()}
    summary = stage.complete({"model": out, "seconds": time.time() - t0, **scalars})
    print(f"[{role}] test accuracy {metrics['test_accuracy']:.4f} ({time.time() - t0:.0f}s)")
    if tracker is not None:
        local = storage.materialize(out)
        tracker.log_stage(role, cfg, metrics={**scalars, **per_class}, params=ccfg.model_dump(mode="json"),
                          artifacts=[os.path.join(local, "confusion_matrix.png"), os.path.join(local, "metrics.json")])
    return summary


def run_teacher(cfg: Config, tracker=None) -> dict:
    return _run(cfg, teacher_dir(cfg), cfg.teacher, "teacher", "hard", None, 1.0, tracker)


def run_student(cfg: Config, labelled_dataset: str, labels: str, tracker=None, stage: StageDir | None = None) -> dict:
    """The Student recipe of ``cfg`` on a labelled dataset; ``stage``: another directory than the pipeline's
    (e.g. a Student on real images, benchmarks/method_quality.py)."""
    return _run(cfg, stage or student_dir(cfg, labels), cfg.student, f"student-{labels}", labels, labelled_dataset,
                cfg.student.temperature, tracker)
