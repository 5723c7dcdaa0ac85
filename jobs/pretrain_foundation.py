"""Pretrain (or reuse) the embedded foundation model: `python jobs/pretrain_foundation.py --config ...`."""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.foundation import run_foundation


def work(args, cfg):
    validate_inputs(cfg)
    with tracked_job(cfg, "pretrain_foundation") as tracker:
        print_json(run_foundation(cfg, tracker))


if __name__ == "__main__":
    main(__doc__, work)
