"""Train (or reuse) the Teacher on the private split: `python jobs/train_teacher.py --config ...`."""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.classifier import run_teacher


def work(args, cfg):
    validate_inputs(cfg)
    with tracked_job(cfg, "train_teacher") as tracker:
        print_json(run_teacher(cfg, tracker))


if __name__ == "__main__":
    main(__doc__, work)
