"""Run every stage in order from one config: `python jobs/pipeline.py --config conf/quickstart.yaml`."""
import _path  # noqa: F401

from synthset.cli import main
from synthset.pipeline import format_summary, run_pipeline


def work(args, cfg):
    print(format_summary(run_pipeline(cfg, resume=not args.no_resume)))


if __name__ == "__main__":
    main(__doc__, work)
