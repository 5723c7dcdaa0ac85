"""The sweep's table and plots: one row per trial, then means and standard errors over seeds.

``trial_rows`` turns Tune's results into rows (grid point, seed, metrics, status); ``aggregate``
groups them by grid point: mean, standard error (sample std / √n; 0 for one seed) and n of each
metric. ``write_tables`` writes ``trials.csv``, ``summary.csv`` and ``summary.md``; ``write_plots``
one PNG per sweep dimension (accuracy vs cardinality in images, vs λ, …; the other dimensions as
separate lines) and, when trials report a LiRA AUC, accuracy vs AUC — error bars over seeds.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from synthset import storage
from synthset.sweep.spec import CARDINALITY, SweepSpec, finite

# Metrics the table shows (those any trial reported), in this order, then any other scalar.
METRICS = ("student_soft_accuracy", "student_hard_accuracy", "lira_student_soft_auc", "lira_student_hard_auc",
           "gen_fid", "gen_precision", "gen_recall", "replication_rate", "trial_stage_seconds", "trial_seconds")


def trial_rows(spec: SweepSpec, results: list[dict]) -> list[dict]:
    """``results``: [{"config": Tune config, "metrics": last report or {}, "status", "trial_id"}]."""
    rows = []
    for r in results:
        cfg, m = r["config"], r.get("metrics") or {}
        row = {"trial_id": r.get("trial_id"), **{d: cfg.get(d) for d in spec.space}, "seed": cfg.get("seed"),
               "images": m.get("images"), "status": r.get("status")}
        row.update({k: m[k] for k in METRICS if finite(m.get(k))})
        rows.append(row)
    return rows


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def metric_names(rows: list[dict]) -> list[str]:
    return [k for k in METRICS if any(finite(r.get(k)) for r in rows)]


def aggregate(spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """One row per grid point: ``images`` and ``<metric>_mean``, ``<metric>_se``, ``<metric>_n`` over seeds."""
    dims = list(spec.space)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(repr(r.get(d)) for d in dims), []).append(r)
    out = []
    for members in groups.values():
        row = {d: members[0].get(d) for d in dims}
        row["images"] = members[0].get("images")
        row["seeds"] = len(members)
        for k in metric_names(rows):
            values = [float(m[k]) for m in members if finite(m.get(k))]
            if values:
                row[f"{k}_mean"], row[f"{k}_se"], row[f"{k}_n"] = _stats(values)
        out.append(row)
    return out


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(spec: SweepSpec, summary: list[dict], rows: list[dict]) -> str:
    dims = list(spec.space)
    metrics = metric_names(rows)
    head = [*dims, "images", "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [_fmt(r.get(d)) for d in dims] + [_fmt(r.get("images")), str(r["seeds"])]
        for k in metrics:
            if f"{k}_mean" not in r:
                cells.append("")
            elif r[f"{k}_n"] > 1:
                cells.append(f"{_fmt(r[f'{k}_mean'])} ± {_fmt(r[f'{k}_se'])}")
            else:
                cells.append(_fmt(r[f"{k}_mean"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMean ± standard error over {len(spec.seeds.values)} seed(s) " \
                              f"({', '.join(spec.seeds.fields)} = {spec.seeds.values}).\n"


def write_tables(spec: SweepSpec, rows: list[dict], out_dir: str) -> dict[str, str]:
    summary = aggregate(spec, rows)
    paths = {"trials_csv": storage.join(out_dir, "trials.csv"), "summary_csv": storage.join(out_dir, "summary.csv"),
             "summary_md": storage.join(out_dir, "summary.md")}
    storage.write_bytes(paths["trials_csv"], _csv(rows).encode())
    storage.write_bytes(paths["summary_csv"], _csv(summary).encode())
    storage.write_bytes(paths["summary_md"], (f"# Sweep {spec.name}\n\n" + markdown_table(spec, summary, rows)).encode())
    return paths


def _x_value(dim: str, row: dict) -> Any:
    return row.get("images") if dim == CARDINALITY else row.get(dim)


def _numeric(values: list[Any]) -> bool:
    return all(finite(v) for v in values)


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes(path, buf.getvalue())


def write_plots(spec: SweepSpec, rows: list[dict], out_dir: str) -> list[str]:
    """Accuracy vs each dimension, and vs LiRA AUC when reported; error bars = standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = aggregate(spec, rows)
    accuracies = [m for m in ("student_soft_accuracy", "student_hard_accuracy")
                  if any(f"{m}_mean" in r for r in summary)]
    paths = []
    for dim in spec.space:
        others = [d for d in spec.space if d != dim]
        xs_all = [_x_value(dim, r) for r in summary]
        numeric = _numeric(xs_all)
        categories = list(dict.fromkeys(map(str, xs_all)))
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for metric in accuracies:
            lines: dict[tuple, list[dict]] = {}
            for r in summary:
                if f"{metric}_mean" in r:  # (a trial ASHA stopped before this Student has none)
                    lines.setdefault(tuple(str(r.get(d)) for d in others), []).append(r)
            for key, members in lines.items():
                members = sorted(members, key=lambda r: _x_value(dim, r) if numeric else categories.index(
                    str(_x_value(dim, r))))
                xs = [_x_value(dim, r) if numeric else categories.index(str(_x_value(dim, r))) for r in members]
                label = metric.removeprefix("student_").removesuffix("_accuracy") + " labels"
                if others:
                    label += " (" + ", ".join(f"{d}={v}" for d, v in zip(others, key)) + ")"
                ax.errorbar(xs, [r.get(f"{metric}_mean") for r in members],
                            yerr=[r.get(f"{metric}_se", 0.0) for r in members], marker="o", capsize=3, label=label)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel("synthetic images (cardinality)" if dim == CARDINALITY else dim)
        ax.set_ylabel("Student test accuracy (CAS)")
        ax.set_title(f"{spec.name}: accuracy vs {dim} (± s.e. over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = storage.join(out_dir, f"accuracy_vs_{dim.replace('.', '_')}.png")
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    aucs = [l for l in ("soft", "hard") if any(f"lira_student_{l}_auc_mean" in r for r in summary)]
    if aucs:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for l in aucs:
            pts = [r for r in summary if f"lira_student_{l}_auc_mean" in r and f"student_{l}_accuracy_mean" in r]
            ax.errorbar([r[f"lira_student_{l}_auc_mean"] for r in pts], [r[f"student_{l}_accuracy_mean"] for r in pts],
                        xerr=[r[f"lira_student_{l}_auc_se"] for r in pts],
                        yerr=[r[f"student_{l}_accuracy_se"] for r in pts], fmt="o", capsize=3, label=f"{l} labels")
            for r in pts:
                ax.annotate(", ".join(str(r.get(d)) for d in spec.space), (r[f"lira_student_{l}_auc_mean"],
                                                                           r[f"student_{l}_accuracy_mean"]), fontsize=6)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("Student LiRA AUC (highest over shadow modes and variants)")
        ax.set_ylabel("Student test accuracy (CAS)")
        ax.set_title(f"{spec.name}: accuracy vs privacy (± s.e. over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = storage.join(out_dir, "accuracy_vs_lira_auc.png")
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths
