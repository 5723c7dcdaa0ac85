"""Evaluate a config's synthetic dataset, Teacher and Students: `python jobs/evaluate.py --config ...`.

Runs the replication gate (if not done), generative metrics, LiRA when `privacy.enabled`, and writes
`<output.root>/evaluate/<hash>/report.md` + `metrics.json` (logged to MLflow). `--rescore` only
re-scores the saved classifiers on the real test set and prints a table.
"""
import _path  # noqa: F401

import sys

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, validate_inputs


def work(args, cfg):
    validate_inputs(cfg)
    if RESCORE:
        from synthset.stages.report import evaluate_classifiers

        print_json(evaluate_classifiers(cfg))
        return
    from synthset.stages.evaluate import run_evaluate

    with tracked_job(cfg, "evaluate") as tracker:
        print_json(run_evaluate(cfg, not args.no_resume, tracker))


RESCORE = "--rescore" in sys.argv
if __name__ == "__main__":
    main(__doc__, work, [a for a in sys.argv[1:] if a != "--rescore"])
