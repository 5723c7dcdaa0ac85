"""Train (or reuse) the Teacher on the private split: `python jobs/train_teacher.py --config ...`."""
import _path  # noqa: F401

from synthset.cli import main
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.classifier import run_teacher
from synthset.stages.common import init_ray
from synthset.tracking import Tracker


def work(args, cfg):
    validate_inputs(cfg)
    init_ray(cfg)
    tracker = Tracker(cfg)
    with tracker.pipeline_run("train_teacher"):
        print_json(run_teacher(cfg, tracker))


if __name__ == "__main__":
    main(__doc__, work)
