"""Train Students on the labelled synthetic dataset only: `python jobs/train_student.py --config ...`.

One Student per entry of ``student.labels`` (soft: Teacher distillation; hard: generation class).
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.classifier import run_student
from synthset.stages.evaluate import student_training_set
from synthset.stages.synthesize import label_dir


def work(args, cfg):
    validate_inputs(cfg)
    labelled = label_dir(cfg)
    if not labelled.is_complete():
        raise FileNotFoundError(f"labelled dataset for this config not found at {labelled.uri}: run jobs/label.py first")
    with tracked_job(cfg, "train_student") as tracker:
        # The replication gate runs (or is reused) first: with action=drop, near-copies never reach a Student.
        dataset = student_training_set(cfg, labelled.summary()["dataset"], not args.no_resume, tracker)
        for labels in cfg.student.labels:
            print_json(run_student(cfg, dataset, labels, tracker))


if __name__ == "__main__":
    main(__doc__, work)
