"""Re-score the saved Teacher and Students of a config on the real test set."""

from __future__ import annotations

from synthset.config import Config
from synthset.data.splits import fit_images, make_splits, to_unit_tensor
from synthset.eval.classification import classification_report
from synthset.models.classifiers import load_classifier
from synthset.models.training import predict_proba
from synthset.stages.classifier import student_dir, teacher_dir
from synthset import storage


def evaluate_classifiers(cfg: Config) -> dict:
    splits = make_splits(cfg.data)
    x = to_unit_tensor(fit_images(splits.test.images, cfg.data.image_size))
    stages = {"teacher": teacher_dir(cfg), **{f"student-{l}": student_dir(cfg, l) for l in cfg.student.labels}}
    results = {}
    for name, stage in stages.items():
        if not stage.is_complete():
            results[name] = {"status": f"not trained for this config ({stage.uri})"}
            continue
        model = load_classifier(storage.materialize(stage.uri))
        report = classification_report(splits.test.labels, predict_proba(model, x), splits.class_names)
        results[name] = {"accuracy": report["accuracy"], "per_class_accuracy": report["per_class_accuracy"]}
    return results
