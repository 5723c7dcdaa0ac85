"""The privacy measurement over training seeds (issue 14): Teacher and Students, mean ± standard error.

    .venv/bin/python benchmarks/privacy_seeds.py [--seeds 0 1 2] [--cardinalities 1 5 10] \
        [--shadow-modes classifier] [--out runs/privacy/seeds]

For every cardinality and seed, runs ``jobs/pipeline.py --config conf/privacy.yaml`` with
``teacher.seed = student.seed = seed`` (``data.splits.seed`` and ``privacy.seed`` fixed: the same
private split, candidates and shadow models for every seed; ``stages/privacy.py: without_training_seeds``)
and ``synthesis.images_per_class`` = cardinality × private training images / classes. Every stage is
cached by hash, so a rerun resumes: the shadows train once, ClassPrompt's images are generated once per
cardinality (its generator reads no private data and no training seed), the Teacher once per seed.
Then reads each evaluation's ``metrics.json`` (``eval/seed_stats.py: seed_rows``), aggregates over seeds
(``aggregate_seeds``) and writes ``<out>/seeds.json`` (per-seed rows and aggregates), ``<out>/seeds.md``
(the table, mean ± SE) and ``<out>/tradeoff_{online,offline}.png`` (``plots.py:
save_tradeoff_errorbars``). Logs: ``<out>/<card>x-seed<seed>.log``. ``--combine LABEL=DIR …`` draws finished
runs of several methods in one table and plot.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))


def seed_table(aggregates: list[dict]) -> str:
    """The aggregates as a Markdown table: accuracy and, online and offline, AUC and TPR at 0.1% / 1% FPR."""
    from synthset.eval.seed_stats import format_mean_se

    cols = ["accuracy"] + [f"{v}_{f}" for v in ("online", "offline")
                           for f in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")]
    head = ["cardinality", "target", "seeds", "accuracy", "online AUC", "online TPR@0.1%", "online TPR@1%",
            "offline AUC", "offline TPR@0.1%", "offline TPR@1%"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sorted(aggregates, key=lambda r: (r["cardinality"], r["target"])):
        cells = [f"{r['cardinality']:g}×", r["target"], ",".join(map(str, r["seeds"]))]
        cells += [format_mean_se(r[c]) if c in r else "–" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table_and_plots(aggregates: list[dict], out: str, what: str) -> None:
    """``<out>/seeds.md`` and ``<out>/tradeoff_{online,offline}.png`` of the aggregates; prints the table."""
    from synthset.plots import save_tradeoff_errorbars

    table = seed_table(aggregates)
    with open(os.path.join(out, "seeds.md"), "w") as f:
        f.write(table + "\n")
    for variant in ("online", "offline"):
        save_tradeoff_errorbars(aggregates, os.path.join(out, f"tradeoff_{variant}.png"), variant,
                                f"Accuracy versus privacy (LiRA {variant}, {what})")
    print(table)


def combine(specs: list[str], out: str) -> None:
    """The aggregates of several methods' seed runs (``LABEL=DIR``) in one table and one pair of plots."""
    aggregates = []
    for i, spec in enumerate(specs):
        label, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"error: --combine {spec!r}: expected LABEL=DIR")
        with open(os.path.join(folder, "seeds.json")) as f:
            rows = json.load(f)["aggregates"]
        for r in rows:
            if r["target"] == "teacher":
                if i == 0:
                    aggregates.append(r)
            else:
                aggregates.append({**r, "target": f"{label} {r['target'].split('/')[0]}"})
    os.makedirs(out, exist_ok=True)
    write_table_and_plots(aggregates, out, ", ".join(s.split("=")[0] for s in specs))


def main() -> None:
    from synthset.config import load_config
    from synthset.eval.seed_stats import aggregate_seeds, seed_rows
    from synthset.stages.evaluate import evaluate_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "conf", "privacy.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cardinalities", type=int, nargs="+", default=[1])
    parser.add_argument("--shadow-modes", default="classifier", help="privacy.shadow_modes, e.g. classifier,pipeline")
    parser.add_argument("--out", default=None, help="default <output.root>/seeds")
    parser.add_argument("--aggregate-only", action="store_true", help="read finished evaluations, run nothing")
    parser.add_argument("--set", action="append", default=[], help="further overrides for every run")
    parser.add_argument("--combine", nargs="+", metavar="LABEL=DIR", default=None,
                        help="run nothing: one table and plot of several finished --out folders (their seeds.json), "
                             "Students labelled by LABEL, the Teacher taken from the first")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.out or "runs/privacy/combined")
    if len(set(args.seeds)) < 2:
        raise SystemExit("error: --seeds: a standard error needs at least two different seeds")
    base = load_config(args.config, args.set)
    out = args.out or os.path.join(base.output.root, "seeds")
    os.makedirs(out, exist_ok=True)
    private = base.data.splits.private - base.data.splits.holdout
    classes = 10
    rows = []
    for card in args.cardinalities:
        for seed in args.seeds:
            sets = [*args.set, f"synthesis.images_per_class={card * private // classes}",
                    f"teacher.seed={seed}", f"student.seed={seed}", f"privacy.shadow_modes=[{args.shadow_modes}]"]
            cfg = load_config(args.config, sets)
            metrics_path = evaluate_dir(cfg).path("metrics.json")
            if not args.aggregate_only and not os.path.exists(metrics_path):
                cmd = [sys.executable, os.path.join(ROOT, "jobs", "pipeline.py"), "--config", args.config]
                for s in sets:
                    cmd += ["--set", s]
                log = os.path.join(out, f"{card}x-seed{seed}.log")
                print(f"[{card}x seed {seed}] {' '.join(cmd[1:])}  (log {log})", flush=True)
                t0 = time.time()
                with open(log, "w") as f:
                    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
                print(f"[{card}x seed {seed}] exit {rc} after {time.time() - t0:.0f}s", flush=True)
                if rc:
                    raise SystemExit(rc)
            if not os.path.exists(metrics_path):
                print(f"[{card}x seed {seed}] no evaluation yet ({metrics_path}): left out", flush=True)
                continue
            with open(metrics_path) as f:
                rows += seed_rows(json.load(f), seed)
    aggregates = aggregate_seeds(rows)
    with open(os.path.join(out, "seeds.json"), "w") as f:
        json.dump({"rows": rows, "aggregates": aggregates}, f, indent=1)
    write_table_and_plots(aggregates, out, f"seeds {args.seeds}")


if __name__ == "__main__":
    main()
