"""The command line every job shares: ``--config``, ``--set key=value``, ``--dry-run``, ``--no-resume``."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable

import synthset.methods  # noqa: F401  (registers the methods a config may name)
from synthset.config import Config, load_config


def parse(description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set synthesis.guidance_scale=2 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, each stage's "
                        "directory and the plan (images, shards, expected GPU-hours); do no work")
    parser.add_argument("--no-resume", action="store_true", help="discard partial outputs of this config and start over")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


def main(description: str, work: Callable[[argparse.Namespace, Config], object], argv: list[str] | None = None) -> None:
    """Parse, then either print the resolved config (--dry-run) or do the job's work."""
    args, cfg = parse(description, argv)
    try:
        if args.dry_run:
            from synthset.pipeline import describe, print_json
            from synthset.projection import format_projection, project_run

            print(cfg.to_yaml())
            print_json(describe(cfg))
            print(format_projection(project_run(cfg)))  # images, shards, expected GPU-hours
            return
        work(args, cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # storage a path names cannot be reached: one line, not a filesystem traceback
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        print(f"error: storage: {first}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def tracked_job(cfg: Config, name: str):
    """Start (or join) Ray and an MLflow parent run named after the job; yields the tracker."""
    from synthset.stages.common import init_ray
    from synthset.tracking import Tracker

    init_ray(cfg)
    tracker = Tracker(cfg)
    with tracker.pipeline_run(name):
        yield tracker
