"""Accuracy versus privacy across evaluated datasets: `python jobs/tradeoff.py METRICS.json... --out DIR`.

Each argument is an evaluation's `metrics.json` (`<output.root>/evaluate/<hash>/metrics.json`, e.g. one per
cardinality); writes `tradeoff.png` (accuracy against LiRA AUC and TPR@0.1% FPR) and `tradeoff.md`.
"""
import _path  # noqa: F401

import argparse
import json
import os

from synthset.stages.report import save_tradeoff_plot, tradeoff_rows, tradeoff_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", nargs="+", help="metrics.json files of evaluated datasets")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--variant", default="online", choices=["online", "offline"])
    args = parser.parse_args()
    loaded = []
    for path in args.metrics:
        with open(path) as f:
            loaded.append(json.load(f))
    rows = tradeoff_rows(loaded, args.variant)
    if not rows:
        raise SystemExit("error: no LiRA results in these metrics files (evaluate with privacy.enabled=true)")
    os.makedirs(args.out, exist_ok=True)
    save_tradeoff_plot(rows, os.path.join(args.out, "tradeoff.png"), f"Accuracy versus privacy (LiRA {args.variant})")
    table = tradeoff_table(rows)
    with open(os.path.join(args.out, "tradeoff.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
