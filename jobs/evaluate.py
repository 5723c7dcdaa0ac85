"""Evaluate the Teacher and Students of a config on the real test set: `python jobs/evaluate.py --config ...`.

Re-scores the saved classifiers (accuracy, per-class accuracy, confusion matrix) and prints a table.
"""
import _path  # noqa: F401

from synthset.cli import main
from synthset.eval.report import evaluate_classifiers
from synthset.pipeline import print_json, validate_inputs


def work(args, cfg):
    validate_inputs(cfg)
    print_json(evaluate_classifiers(cfg))


if __name__ == "__main__":
    main(__doc__, work)
