"""Pictures people would rather look at than read: sample grids, confusion matrices, curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, nrow: int, scale: int = 2, pad: int = 2,
               row_labels: list[str] | None = None) -> Image.Image:
    """uint8 images (N, H, W[, C]) → one PIL image, ``nrow`` images per row, optional row labels."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None].repeat(3, axis=-1)
    elif images.shape[-1] == 1:
        images = images.repeat(3, axis=-1)
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    label_w = 80 if row_labels else 0
    H, W = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + nrow * W + pad, rows * H + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + c * W, pad + r * H))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * H + H // 2 - 6), label[:12], fill=(0, 0, 0))
    return canvas


def save_class_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path,
                    per_class: int = 10) -> None:
    """A grid with one row per class, the first ``per_class`` images of each."""
    rows = []
    for c in range(len(class_names)):
        idx = np.flatnonzero(labels == c)[:per_class]
        tiles = images[idx]
        if len(tiles) < per_class:  # pad short rows with blank tiles
            tiles = np.concatenate([tiles, np.full((per_class - len(tiles), *images.shape[1:]), 255, np.uint8)])
        rows.append(tiles)
    image_grid(np.concatenate(rows), per_class, row_labels=class_names).save(path)


def save_confusion_matrix(cm: np.ndarray, class_names: list[str], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves(curves: dict[str, list[float]], path: str | Path, title: str, log_y: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=float)
        k = max(1, len(ys) // 100)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def errorbar_series(rows: list[dict], variant: str = "online") -> dict[str, dict[str, list[float]]]:
    """Per target, the points of the error-bar trade-off plot, ordered by cardinality.

    ``rows``: ``eval/seed_stats.py: aggregate_seeds`` output (per row ``cardinality``, ``target`` and figures
    ``accuracy``, ``<variant>_auc``, ``<variant>_tpr_at_0.001_fpr`` as {mean, se, n}). Returns target →
    {"cardinality", "accuracy", "accuracy_se", "auc", "auc_se", "tpr", "tpr_se", "n"}; an SE of NaN (one seed)
    becomes 0 (no bar). Raises ``ValueError`` naming the row and figure when one is missing.
    """
    keys = {"accuracy": "accuracy", "auc": f"{variant}_auc", "tpr": f"{variant}_tpr_at_0.001_fpr"}
    for r in rows:
        for k in keys.values():
            if k not in r:
                raise ValueError(f"rows: {r.get('target')} at {r.get('cardinality')}x has no {k!r}")
    out = {}
    for target in sorted({r["target"] for r in rows}):
        sel = sorted([r for r in rows if r["target"] == target], key=lambda r: r["cardinality"])
        series = {"cardinality": [r["cardinality"] for r in sel], "n": [r["accuracy"]["n"] for r in sel]}
        for name, k in keys.items():
            series[name] = [r[k]["mean"] for r in sel]
            series[f"{name}_se"] = [0.0 if np.isnan(r[k]["se"]) else r[k]["se"] for r in sel]
        out[target] = series
    return out


def save_tradeoff_errorbars(rows: list[dict], path: str | Path, variant: str = "online",
                            title: str = "Accuracy versus privacy") -> None:
    """Accuracy against LiRA AUC and TPR at 0.1% FPR, each point the mean over seeds with ±1 SE bars both ways.

    ``rows`` as in ``errorbar_series`` (one line per target across cardinalities).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for target, s in errorbar_series(rows, variant).items():
        for ax, key in zip(axes, ("auc", "tpr")):
            ax.errorbar(s[key], s["accuracy"], xerr=s[f"{key}_se"], yerr=s["accuracy_se"], marker="o", capsize=3,
                        label=f"{target} (n={min(s['n'])} seeds)")
            if target != "teacher":
                for c, x, y in zip(s["cardinality"], s[key], s["accuracy"]):
                    ax.annotate(f"{c:g}×", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    finish_tradeoff(fig, axes, f"LiRA AUC ({variant}), mean ± SE over seeds", f"LiRA TPR at 0.1% FPR ({variant}), mean ± SE",
                    "test accuracy, mean ± SE", title, path)


def finish_tradeoff(fig, axes, auc_label: str, tpr_label: str, ylabel: str, title: str, path: str | Path) -> None:
    """Labels, the AUC = 0.5 chance line and the legend of an accuracy-vs-LiRA figure (AUC, TPR axes); saved, closed."""
    import matplotlib.pyplot as plt

    axes[0].axvline(0.5, ls="--", color="gray", lw=1)
    axes[0].set_xlabel(auc_label)
    axes[1].set_xlabel(tpr_label)
    for ax in axes:
        ax.set_ylabel(ylabel)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
