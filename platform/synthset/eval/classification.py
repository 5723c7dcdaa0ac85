"""Classification metrics on the real test set: accuracy (CAS for Students), per class, confusion."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def classification_report(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, len(class_names))
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    return {"accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
            "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class)},
            "confusion_matrix": cm.tolist()}
