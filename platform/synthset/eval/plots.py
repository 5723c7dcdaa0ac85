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
