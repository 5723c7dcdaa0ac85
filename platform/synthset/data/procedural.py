"""A procedural RGB image folder of any size: what memory and scale are measured on (no download needed).

``write_image_folder(root, images, size, classes)`` writes ``root/<class>/<nnnnnn>.jpg``: each class is a
shape (disc, square, triangle, cross, ring, bars, …) of its own colour range on a noisy background, at a
random place, size and tint, so a classifier has something to learn and no two images are alike. Used by
``benchmarks/data_scale.py`` and the memory tests; deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars", "diamond", "dots", "frame", "stripes")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r / 3)))
    elif shape == "bars":
        for k in range(3):
            x = cx - r + k * r
            draw.rectangle([x - r / 6, cy - r, x + r / 6, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "dots":
        for dx in (-r / 2, r / 2):
            for dy in (-r / 2, r / 2):
                draw.ellipse([cx + dx - r / 4, cy + dy - r / 4, cx + dx + r / 4, cy + dy + r / 4], fill=fill)
    elif shape == "frame":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r / 4)))
    else:  # stripes
        for k in range(-2, 3):
            y = cy + k * r / 2.5
            draw.rectangle([cx - r, y - r / 10, cx + r, y + r / 10], fill=fill)


def write_image_folder(root: str | Path, images: int, size: int = 128, classes: int = 10, seed: int = 0,
                       quality: int = 90) -> Path:
    """Write ``images`` JPEGs of ``size`` px spread evenly over ``classes`` class folders; returns ``root``."""
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes: 2..{len(SHAPES)} (got {classes})")
    root = Path(root)
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 255, classes, endpoint=False)
    for c in range(classes):
        (root / SHAPES[c]).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        background = rng.integers(0, 80, 3)
        noise = rng.integers(-12, 13, (size, size, 3))
        canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(canvas, "RGB")
        tint = np.clip(np.array([hues[c], 255 - hues[c], 128 + hues[c] / 2]) + rng.integers(-40, 41, 3), 0, 255)
        r = size * rng.uniform(0.15, 0.3)
        cx, cy = (size * rng.uniform(0.3, 0.7) for _ in range(2))
        _draw(ImageDraw.Draw(image), SHAPES[c], cx, cy, r, tuple(int(v) for v in tint))
        image.save(root / SHAPES[c] / f"{i:06d}.jpg", quality=quality)
    return root
