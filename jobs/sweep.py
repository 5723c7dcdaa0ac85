"""A Ray Tune sweep over the downstream stages: `python jobs/sweep.py --config conf/sweep.yaml`.

`--set key=value` overrides every trial's pipeline config (e.g. output.root), `--sweep-set key=value`
the sweep file (e.g. max_concurrent_trials=1). A sweep resumes by default (Tuner.restore of its
experiment under <output.root>/sweeps/); `--no-resume` starts its Tune experiment over (finished
stages are still reused). `--dry-run` validates every trial and prints the plan. See docs/sweeps.md.
"""
import argparse
import json
import sys

import _path  # noqa: F401


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep file (conf/sweep.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override every trial's pipeline config (repeatable)")
    parser.add_argument("--sweep-set", dest="sweep_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the sweep file's sweep: section (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate every trial, print the plan, run nothing")
    parser.add_argument("--no-resume", action="store_true", help="start the Tune experiment over")
    args = parser.parse_args(argv)
    from synthset.sweep.driver import describe_sweep, format_description, format_sweep, run_sweep
    from synthset.sweep.spec import load_sweep

    try:
        sweep = load_sweep(args.config, args.sweep_overrides, args.overrides)
        if args.dry_run:
            plan = describe_sweep(sweep)
            print(json.dumps(plan, indent=1))
            print(format_description(plan))
            return
        print(format_sweep(run_sweep(sweep, resume=not args.no_resume)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
