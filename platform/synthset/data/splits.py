"""Seeded, disjoint, recorded splits of a real dataset: public / private / test.

``public`` pretrains the foundation model; ``private`` is the user's real data (Teacher,
adaptation, membership inference); ``test`` is the official test set, never trained on.
The split is a seeded permutation of the training set, recorded as index lists in
``splits.json`` so every later stage (and every audit) sees exactly the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synthset.config import DataConfig
from synthset.data.sources import ImageSet, load_digits_fixture, load_fashion_mnist


@dataclass
class Splits:
    public: ImageSet
    private: ImageSet
    test: ImageSet
    public_index: np.ndarray
    private_index: np.ndarray

    @property
    def class_names(self) -> list[str]:
        return self.private.class_names

    def record(self) -> dict:
        return {"public": self.public_index.tolist(), "private": self.private_index.tolist(),
                "test": "official test set", "class_names": self.class_names}


def split_indices(n_train: int, public: int, private: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets drawn from one seeded permutation of ``range(n_train)``."""
    if public + private > n_train:
        raise ValueError(f"data.splits: public ({public}) + private ({private}) exceed the "
                         f"{n_train} training images of the source")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[:public]), np.sort(perm[public:public + private])


def load_source(cfg: DataConfig, cache_dir: str | Path = "~/.cache/synthset/fashion-mnist") -> tuple[ImageSet, ImageSet]:
    if cfg.source == "fashion_mnist":
        return load_fashion_mnist(cfg.root, cfg.download, cache_dir)
    return load_digits_fixture()


def make_splits(cfg: DataConfig) -> Splits:
    train, test = load_source(cfg)
    pub, priv = split_indices(len(train), cfg.splits.public, cfg.splits.private, cfg.splits.seed)
    empty = [train.class_names[c] for c in range(len(train.class_names)) if not (train.labels[priv] == c).any()]
    if empty:
        raise ValueError(f"data.splits.private: no images of class(es) {empty}; increase data.splits.private")
    return Splits(train.subset(pub), train.subset(priv), test, pub, priv)


def write_splits(splits: Splits, path: str | Path) -> None:
    Path(path).write_text(json.dumps(splits.record()))


def fit_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) → uint8 (N, size, size): zero-pad when a little larger (28 → 32), else resize."""
    n, h, w = images.shape
    if h == w == size:
        return images
    if size >= h and size >= w and size - max(h, w) <= max(h, w) // 4:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, size, size), dtype=np.uint8)
        out[:, top:top + h, left:left + w] = images
        return out
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def to_unit_tensor(images: np.ndarray):
    """uint8 (N, H, W[, C]) → float32 torch tensor (N, C, H, W) in [-1, 1], as the models expect."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
