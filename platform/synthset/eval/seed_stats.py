"""Figures over training seeds: mean ± standard error of accuracy and LiRA results (issue 14, item 2).

A privacy or accuracy figure from one training run says little at this scale (LiRA's AUC over 400
candidates has a standard error near 0.02; a Student's accuracy moves by a point between seeds), so
the measurement repeats the pipeline with the data split fixed (``data.splits.seed``) and the
training seeds varied (``teacher.seed``, ``student.seed``), and reports every figure as the mean over
seeds ± its standard error s / √n (s the sample standard deviation, ddof = 1).

* ``mean_se``: one figure over seeds.
* ``seed_rows``: the rows of one evaluation's ``metrics.json`` (``stages/evaluate.py``): one per LiRA
  target, with its accuracy and, per LiRA variant, AUC and TPR at 0.1% and 1% FPR.
* ``aggregate_seeds``: rows of several seeds → one row per (cardinality, target), each figure as
  {mean, se, n, values}; a group must hold one row per seed, each seed once.
* ``format_mean_se``: "0.612 ± 0.008" for tables.

Driver: ``benchmarks/privacy_seeds.py``; the error-bar plot: ``plots.py: save_tradeoff_errorbars``;
tests: ``tests/stages/test_privacy_seeds.py``.
"""

from __future__ import annotations

import math

import numpy as np

# Per LiRA variant, the figures every row carries (the names of ``eval/lira.py: roc_metrics``).
LIRA_FIGURES = ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")
VARIANTS = ("online", "offline", "online_fixed_var", "offline_fixed_var")


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of finite ``values``; SE = sample std (ddof 1) / √n, NaN for n = 1.

    Raises ``ValueError`` for no values or a non-finite one (a missing figure must not pass as data).
    """
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("values: no values to average")
    if not np.isfinite(x).all():
        raise ValueError(f"values: non-finite value among {x.tolist()}")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se, int(x.size)


def seed_rows(metrics: dict, seed: int) -> list[dict]:
    """One evaluation's LiRA targets as flat rows: seed, cardinality, target, role, accuracy, ``<variant>_<figure>``.

    ``metrics``: an evaluation's ``metrics.json`` (``lira.targets`` per target key such as ``teacher`` or
    ``student-soft/pipeline``, ``teacher_accuracy``, ``student_<labels>_accuracy``, ``cardinality``).
    Variants the evaluation lacks (per-example variance needs ≥ 2 shadows a side) are left out.
    """
    targets = metrics.get("lira", {}).get("targets", {})
    if not targets:
        raise ValueError(f"metrics (seed {seed}): no LiRA results (evaluate with privacy.enabled=true)")
    rows = []
    for key, r in targets.items():
        if r.get("role", "student" if "/" in key else "teacher") == "teacher":
            accuracy = metrics["teacher_accuracy"]
        else:
            accuracy = metrics[f"student_{r['labels']}_accuracy"]
        row = {"seed": int(seed), "cardinality": float(metrics["cardinality"]), "target": key,
               "accuracy": float(accuracy)}
        for variant, m in r["variants"].items():
            for figure in LIRA_FIGURES:
                row[f"{variant}_{figure}"] = float(m[figure])
        rows.append(row)
    return rows


def aggregate_seeds(rows: list[dict], by: tuple[str, ...] = ("cardinality", "target")) -> list[dict]:
    """Rows of several seeds → one row per ``by`` group: the group's keys, ``seeds``, and per numeric figure
    {"mean", "se", "n", "values"} (values in seed order).

    Every group must have the same seeds as the first group and each seed once; a figure must be present
    in every row of its group. Violations raise ``ValueError`` naming the group: averaging over different
    seed sets would make the rows incomparable.
    """
    if not rows:
        raise ValueError("rows: nothing to aggregate")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    seeds = None
    out = []
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        these = [r["seed"] for r in group]
        if len(set(these)) != len(these):
            raise ValueError(f"{dict(zip(by, key))}: seed repeated in {these}")
        if seeds is None:
            seeds = these
        elif these != seeds:
            raise ValueError(f"{dict(zip(by, key))}: seeds {these} differ from the other groups' {seeds}")
        agg = {**dict(zip(by, key)), "seeds": these}
        figures = [k for k, v in group[0].items() if k not in by and k != "seed" and isinstance(v, (int, float))]
        for f in figures:
            missing = [r["seed"] for r in group if f not in r]
            if missing:
                raise ValueError(f"{dict(zip(by, key))}: {f} missing for seed(s) {missing}")
            values = [float(r[f]) for r in group]
            mean, se, n = mean_se(values)
            agg[f] = {"mean": mean, "se": se, "n": n, "values": values}
        out.append(agg)
    return out


def format_mean_se(figure: dict, digits: int = 3) -> str:
    """``{"mean": 0.6123, "se": 0.0081, ...}`` → ``"0.612 ± 0.008"`` (the mean alone when n = 1)."""
    if math.isnan(figure["se"]):
        return f"{figure['mean']:.{digits}f}"
    return f"{figure['mean']:.{digits}f} ± {figure['se']:.{digits}f}"
