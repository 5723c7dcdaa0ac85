"""Read the real data once and write its splits as shards: `python jobs/prepare.py --config ...`.

Every other job runs this stage first when it has not run for the config's ``data`` section.
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json
from synthset.stages.prepare import run_prepare


def work(args, cfg):
    with tracked_job(cfg, "prepare") as tracker:
        print_json(run_prepare(cfg, tracker))


if __name__ == "__main__":
    main(__doc__, work)
