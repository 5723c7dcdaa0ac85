"""Where is the public/private gap, and how much of it does a synthetic dataset close?

    .venv/bin/python benchmarks/adaptation_gap.py --config conf/quickstart.yaml \\
        --dataset runs/quickstart/synthesis/<hash> [--dataset …] [--json out.json]

Measures, per class, the item properties of ``image_properties`` (size = fraction of item pixels,
aspect, brightness, texture) plus the item's bounding-box height and the row of its centre of
mass, on three kinds of images: the real private split (what the Student is tested against),
the *shifted* public split the foundation was pretrained on, and each synthetic dataset given.
For every property it prints the fraction of the public→private gap the dataset closes,
``(synthetic − public) / (private − public)``: 0 = the foundation's world, 1 = the real data.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import synthset.methods  # noqa: E402,F401  (registers the methods a config may name)
from synthset.config import load_config  # noqa: E402
from synthset.data.shards import iter_shard, shard_paths  # noqa: E402
from synthset.data.splits import fit_images, make_splits  # noqa: E402
from synthset.models.captioners import ITEM_THRESHOLD, _to_grey, image_properties  # noqa: E402

PROPS = ("size", "height", "aspect", "brightness", "texture", "centre_row")


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """``image_properties`` plus bounding-box height (fraction of the image) and centre-of-mass row."""
    props = image_properties(images)
    x = _to_grey(images)
    frame = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    item = np.abs(x - np.median(frame, axis=1)[:, None, None]) > ITEM_THRESHOLD
    rows = item.any(axis=2)
    first, last = rows.argmax(axis=1), rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1)
    mass = item.sum(axis=2).astype(np.float64)
    centre = (mass * np.arange(mass.shape[1])).sum(axis=1) / np.maximum(mass.sum(axis=1), 1)
    blank = ~rows.any(axis=1)
    props["height"] = np.where(blank, np.nan, (last - first + 1) / rows.shape[1])
    props["centre_row"] = np.where(blank, np.nan, centre / (rows.shape[1] - 1))
    return props


def per_class(images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    props = measure(images)
    out = {p: np.array([np.nanmean(props[p][labels == c]) if (labels == c).any() else np.nan
                        for c in range(num_classes)]) for p in PROPS}
    out["blank"] = np.array([float(np.isnan(props["size"][labels == c]).mean()) for c in range(num_classes)])
    return out


def read_dataset(path: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for shard in shard_paths(path):
        for sample in iter_shard(shard):
            images.append(sample["image"])
            labels.append(int(sample["cls"]))
            if len(images) >= limit:
                return np.stack(images), np.array(labels)
    return np.stack(images), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--dataset", action="append", default=[], help="synthesis (or label) stage directory")
    parser.add_argument("--name", action="append", default=[], help="a name per --dataset for the table")
    parser.add_argument("--limit", type=int, default=5000, help="images read per set")
    parser.add_argument("--json", default=None, help="also write the per-class numbers here")
    args = parser.parse_args()
    cfg = load_config(args.config)
    splits = make_splits(cfg.data)
    names = splits.class_names
    rng = np.random.default_rng(0)
    sets = {}
    for label, part in (("private", splits.private), ("public", splits.public)):
        pick = rng.choice(len(part), size=min(args.limit, len(part)), replace=False)
        # as the generator sees them: fitted to data.image_size (Fashion-MNIST: zero-padded 28 → 32)
        sets[label] = per_class(fit_images(part.images[pick], cfg.data.image_size), part.labels[pick], len(names))
    for i, path in enumerate(args.dataset):
        name = args.name[i] if i < len(args.name) else os.path.basename(os.path.normpath(path))
        images, labels = read_dataset(path, args.limit)
        sets[name] = per_class(images, labels, len(names))
    real, public = sets["private"], sets["public"]
    print("Mean over classes (private | public | each dataset), and the fraction of the gap closed:")
    print("| set | " + " | ".join(PROPS) + " | blank |")
    print("| --- |" + " ---: |" * (len(PROPS) + 1))
    for name, s in sets.items():
        cells = []
        for p in PROPS:
            value = float(np.nanmean(s[p]))
            if name in ("private", "public"):
                cells.append(f"{value:.3f}")
            else:
                gap = real[p] - public[p]
                closed = np.nanmean(np.where(np.abs(gap) > 1e-6, (s[p] - public[p]) / gap, np.nan))
                cells.append(f"{value:.3f} ({closed:+.0%})")
        print(f"| {name} | " + " | ".join(cells) + f" | {float(np.mean(s['blank'])):.1%} |")
    print("\nItem size (fraction of pixels) per class:")
    print("| set | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for name, s in sets.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in s["size"]) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {k: v.tolist() for k, v in s.items()} for name, s in sets.items()}, f, indent=1)


if __name__ == "__main__":
    main()
