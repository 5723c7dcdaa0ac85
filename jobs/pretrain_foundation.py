"""Pretrain (or reuse) the embedded foundation model: `python jobs/pretrain_foundation.py --config ...`."""
import _path  # noqa: F401

from synthset.cli import main
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.common import init_ray
from synthset.stages.foundation import run_foundation
from synthset.tracking import Tracker


def work(args, cfg):
    validate_inputs(cfg)
    init_ray(cfg)
    tracker = Tracker(cfg)
    with tracker.pipeline_run("pretrain_foundation"):
        print_json(run_foundation(cfg, tracker))


if __name__ == "__main__":
    main(__doc__, work)
