"""Seeded, disjoint, recorded splits of a real dataset: public / private / test.

``public`` pretrains the foundation model; ``private`` is the user's real data (Teacher,
adaptation, membership inference); ``test`` is the official test set, never trained on.
The split is a seeded permutation of the training set, recorded as index lists in
``splits.json`` so every later stage (and every audit) sees exactly the same images. The prepare
stage (``stages/prepare.py``) splits the source once with ``split_source`` and writes the splits
as shards (``data/prepare.py``); the other stages read those, not the source.

Public and private images are drawn from one distribution, so a foundation model pretrained on
the public split would already fit the private data and no adaptation could help. The embedded
default therefore makes the gap real: ``data.public_shift`` transforms the public images only
(``shift_images``) and ``data.public_classes`` can hold classes out of them. Private and test
images are never transformed.

``data.splits.holdout`` sets private images aside as known non-members for membership inference
(``holdout_indices``): a seeded random subset of the private pool (generator seeded with
``[data.splits.seed, 7]``) becomes ``Splits.holdout``, and ``Splits.private`` — what the Teacher,
captioning, adaptation and everything else trains on — is the rest of the pool. With ``holdout: 0``
the private indices are exactly those without the feature.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synthset.config import PUBLIC_SHIFTS, DataConfig
from synthset.data.images import fit_images  # noqa: F401 (re-exported: the stages import it from here)
from synthset.data.source_base import ImageSet
from synthset.data.sources import FASHION_MNIST_CACHE, open_source


# Parameters of the public shifts (data.public_shift). Measured gap on Fashion-MNIST (a small CNN
# trained 4 epochs on 8,000 shifted training images, tested on 4,000 real test images; unshifted:
# 85%): shrink 53%, blur 49%, flip 41%, invert 13%.
SHRINK_SCALE = 0.7   # items keep 70% of their height and width, centred
BLUR_RADIUS = 1.0    # Gaussian blur radius in pixels (PIL), at the source resolution


@dataclass
class Splits:
    """The splits of a source: ``ImageSet`` s in memory (``split_source``, the reference tests compare with) or
    ``data.prepare.PreparedSplit`` handles over the prepared shards (``read_prepared``: what stages get)."""

    public: ImageSet
    private: ImageSet
    test: ImageSet
    public_index: np.ndarray
    private_index: np.ndarray
    public_shift: str = "none"
    public_unshifted: ImageSet | None = None  # the public images before ``public_shift``
    holdout: ImageSet | None = None  # private images nothing trains on (data.splits.holdout), else None
    holdout_index: np.ndarray | None = None

    @property
    def class_names(self) -> list[str]:
        return self.private.class_names

    def record(self) -> dict:
        return split_record(self.class_names, self.public_index, self.public.labels, self.private_index,
                            self.holdout_index, self.public_shift)


def split_indices(n_train: int, public: int, private: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets drawn from one seeded permutation of ``range(n_train)``."""
    if public + private > n_train:
        raise ValueError(f"data.splits: public ({public}) + private ({private}) exceed the "
                         f"{n_train} training images of the source")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[:public]), np.sort(perm[public:public + private])


def holdout_indices(private_pool: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(private training indices, holdout indices): a seeded random ``holdout`` of the pool, both sorted.

    The draw uses its own generator (``[seed, 7]``), so the pool itself, and with ``holdout == 0``
    the private split, are exactly ``split_indices``'s.
    """
    if holdout == 0:
        return private_pool, private_pool[:0]
    if holdout >= len(private_pool):
        raise ValueError(f"data.splits.holdout: {holdout} leaves none of the {len(private_pool)} private images")
    held = np.sort(np.random.default_rng([seed, 7]).choice(private_pool, holdout, replace=False))
    return np.setdiff1d(private_pool, held), held


def in_test_set(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which images form the test set of a source without one: about ``fraction`` of them, by key.

    An image is in the test set when the sha256 of its key, read as a number in [0, 1), is below
    ``fraction``. No seed: the test set is the same for every ``data.splits.seed`` (results of
    different seeds stay comparable), and adding or removing other images never moves an image
    between train and test.
    """
    digests = (hashlib.sha256(f"synthset-test/{k}".encode()).digest()[:8] for k in keys)
    return np.fromiter((int.from_bytes(d, "big") / 2.0 ** 64 < fraction for d in digests), bool, len(keys))


def test_rows(keys, fraction: float) -> np.ndarray:
    """Which of a source's training images form its test set (``in_test_set``), or a ``ValueError`` when
    ``data.test_fraction`` leaves no training or no test image."""
    in_test = in_test_set(np.asarray(keys), fraction)
    if in_test.all() or not in_test.any():
        left = "no training" if in_test.all() else "no test"
        raise ValueError(f"data.test_fraction: {fraction} of the {len(in_test)} images of data.path leaves "
                         f"{left} images; add images or give data.test_path / data.test_split")
    return in_test


def report_skipped(skipped: list) -> None:
    """Say on stderr which unreadable images ``data.on_bad_image: skip`` left out."""
    if skipped:
        names = ", ".join(s.name for s in skipped[:5]) + (", …" if len(skipped) > 5 else "")
        print(f"data: skipped {len(skipped)} unreadable image(s) (data.on_bad_image=skip): {names}", file=sys.stderr)


def load_source(cfg: DataConfig, cache_dir: str | Path = FASHION_MNIST_CACHE) -> tuple[ImageSet, ImageSet]:
    """(train, test) images of ``data.source`` in ``data.channels``, all in memory.

    The in-memory reference of what the prepare stage writes (tests compare the two); the stage itself
    never holds a part (``data/prepare.py``). Sources whose images share one size (Fashion-MNIST,
    digits) keep it, as the stages expect; the others (any size) are fitted to ``data.image_size``. A
    source without its own test images gives up ``data.test_fraction`` of them (``in_test_set``).
    Images skipped under ``data.on_bad_image: skip`` are listed in the returned sets' ``skipped`` and
    on stderr.
    """
    source = open_source(cfg, cache_dir)
    size = None if source.native_size else cfg.image_size
    train = source.load("train", size)
    if "test" in source.parts:
        test = source.load("test", size)
    else:
        in_test = test_rows(train.keys, cfg.test_fraction)
        skipped = train.skipped
        train, test = train.subset(np.flatnonzero(~in_test)), train.subset(np.flatnonzero(in_test))
        train.skipped = skipped
    for part in (train, test):
        report_skipped(part.skipped)
    return train, test


def _border_fill(images: np.ndarray) -> np.ndarray:
    """Per-image background value: the median of the one-pixel frame (per channel)."""
    frame = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    return np.median(frame, axis=1).astype(np.uint8)


def shift_images(images: np.ndarray, kind: str) -> np.ndarray:
    """Apply the public shift ``kind`` (see ``DataConfig.public_shift``) to uint8 (N, H, W[, C]) images.

    ``shrink`` scales each image to ``SHRINK_SCALE`` of its size and centres it on its own
    background (the median of its border), ``blur`` is a Gaussian blur of ``BLUR_RADIUS`` pixels,
    ``flip`` turns images upside down, ``invert`` makes negatives, ``none`` returns them as they are.
    """
    if kind not in PUBLIC_SHIFTS:
        raise ValueError(f"data.public_shift: unknown shift {kind!r}; choose from {list(PUBLIC_SHIFTS)}")
    if kind == "none" or len(images) == 0:
        return images
    if kind == "flip":
        return np.ascontiguousarray(images[:, ::-1])
    if kind == "invert":
        return 255 - images
    if kind == "blur":
        from PIL import ImageFilter

        blur = ImageFilter.GaussianBlur(BLUR_RADIUS)
        return np.stack([np.asarray(Image.fromarray(im).filter(blur)) for im in images]).astype(np.uint8)
    if kind == "shrink":
        n, h, w = images.shape[:3]
        sh, sw = max(1, round(SHRINK_SCALE * h)), max(1, round(SHRINK_SCALE * w))
        top, left = (h - sh) // 2, (w - sw) // 2
        fill = _border_fill(images)
        out = np.empty_like(images)
        out[:] = fill[:, None, None]
        for i, im in enumerate(images):
            out[i, top:top + sh, left:left + sw] = np.asarray(Image.fromarray(im).resize((sw, sh), Image.BILINEAR))
        return out
    raise NotImplementedError(kind)  # a shift listed in PUBLIC_SHIFTS without an implementation


def public_class_ids(cfg: DataConfig, class_names: list[str]) -> list[int]:
    """Indices of the classes the public split keeps (``data.public_classes``; None keeps all)."""
    if cfg.public_classes is None:
        return list(range(len(class_names)))
    unknown = [c for c in cfg.public_classes if c not in class_names]
    if unknown or not cfg.public_classes:
        raise ValueError(f"data.public_classes: {'unknown class(es) ' + str(unknown) if unknown else 'empty'}; "
                         f"choose from {class_names}")
    return sorted(class_names.index(c) for c in set(cfg.public_classes))


def make_splits(cfg: DataConfig) -> Splits:
    """Read ``data.source`` and split it. Stages do not call this: they read the prepared splits
    (``stages.prepare.load_splits``), which the prepare stage wrote with ``split_source`` once."""
    train, test = load_source(cfg)
    return split_source(cfg, train, test)


def draw_splits(cfg: DataConfig, labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, ...]:
    """(public, private, holdout) indices into a source's training images (``labels``: their classes).

    Seeded (``split_indices``, ``holdout_indices``); the public split keeps ``data.public_classes``.
    A class without a private training image is a ``ValueError`` saying what would fix it.
    """
    pub, priv = split_indices(len(labels), cfg.splits.public, cfg.splits.private, cfg.splits.seed)
    priv, held = holdout_indices(priv, cfg.splits.holdout, cfg.splits.seed)
    empty = [class_names[c] for c in range(len(class_names)) if not (labels[priv] == c).any()]
    if empty:
        raise ValueError(f"data.splits.private: no images of class(es) {empty}; increase data.splits.private")
    return pub[np.isin(labels[pub], public_class_ids(cfg, class_names))], priv, held


def split_record(class_names: list[str], public_index: np.ndarray, public_labels: np.ndarray,
                 private_index: np.ndarray, holdout_index: np.ndarray | None, public_shift: str) -> dict:
    """What ``splits.json`` records (``Splits.record``): indices into the source's training images."""
    return {"public": public_index.tolist(), "private": private_index.tolist(),
            "test": "official test set", "class_names": class_names,
            "public_shift": public_shift,
            "holdout": [] if holdout_index is None else holdout_index.tolist(),
            "public_classes": sorted({class_names[c] for c in np.unique(public_labels)}, key=class_names.index)}


def split_source(cfg: DataConfig, train: ImageSet, test: ImageSet) -> Splits:
    """The seeded public / private / holdout / test splits of a source's (train, test) images, in memory."""
    pub, priv, held = draw_splits(cfg, train.labels, train.class_names)
    original = train.subset(pub)
    public = ImageSet(shift_images(original.images, cfg.public_shift), original.labels, original.class_names,
                      original.keys)
    return Splits(public, train.subset(priv), test, pub, priv, cfg.public_shift, original,
                  train.subset(held) if len(held) else None, held if len(held) else None)


def write_splits(splits: Splits, path: str | Path) -> None:
    Path(path).write_text(json.dumps(splits.record()))


def to_unit_tensor(images: np.ndarray, channels: int | None = None):
    """uint8 (N, H, W[, C]) → float32 torch tensor (N, C, H, W) in [-1, 1], as the models expect.

    ``channels``: what the model reads, when it may differ from the images (a 3-channel VAE of
    Stable Diffusion adapting to grayscale data): grayscale is repeated to RGB, RGB becomes
    ITU-R 601-2 luma (PIL's "L" weights); None keeps the images' own channels.
    """
    import torch

    if channels is not None and images.ndim == 4 and images.shape[-1] == 3 and channels == 1:
        luma = images.astype(np.float64) @ np.array([299 / 1000, 587 / 1000, 114 / 1000])
        images = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if channels is not None and x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x


class UnitImages:
    """uint8 images (N, H, W[, C]) that index like ``to_unit_tensor(images).to(device)``: ``x[idx]`` converts just
    the rows asked for, so a training loop that draws batches by index holds the images at 1 byte a pixel
    instead of 4 (the same float values, a batch at a time)."""

    def __init__(self, images: np.ndarray, device="cpu", channels: int | None = None):
        self.images, self.device, self.channels = images, device, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):
        import torch

        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        rows = self.images[idx]
        return to_unit_tensor(rows if rows.ndim == self.images.ndim else rows[None], self.channels).to(self.device)
