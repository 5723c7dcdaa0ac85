"""The prepared real data: the splits of a source written once as WebDataset shards, read back as arrays.

The prepare stage (``stages/prepare.py``) reads ``data.source`` once, converts every image to
``data.channels`` and fits it to ``data.image_size`` (sources whose images share one size —
Fashion-MNIST, digits — keep that size, as ``splits.load_source`` always has: the stages fit
them, so the embedded default's outputs do not change), splits it (``splits.split_indices``,
``holdout_indices``, ``public_classes``) and writes, under one directory::

    public/   private/   holdout/   test/     one WebDataset dataset per split (shards.py contract):
                                              <key>.png, <key>.cls, <key>.json = {"position", "index",
                                              "source_key"}, and manifest.json written last
    splits.json                               the split record (``Splits.record``): indices, class names
    prepared.json                             what was prepared (channels, image shape, counts), written last

Keys are ``<split>-<position>`` (``private-00000042``) because a shard key may hold neither
``.`` nor ``/``; the source's own key is kept in ``source_key``. ``index`` is the image's index
in the source's training set, as in ``splits.json``. The public split is stored *before*
``data.public_shift``: ``read_prepared`` applies the shift when it materialises the arrays, so
``Splits.public_unshifted`` needs no second copy.

Everything after the prepare stage reads these shards (``read_prepared``), never the source.
Plain functions of arrays and paths: no Ray here.
"""

from __future__ import annotations

import json

import numpy as np

from synthset import storage
from synthset.config import DataConfig
from synthset.data.shards import iter_shard, read_manifest, write_manifest, write_shard
from synthset.data.sources import ImageSet

SPLIT_NAMES = ("public", "private", "holdout", "test")
PREPARED = "prepared.json"
SHARD_SIZE = 1000  # images per shard (a few MB at 32 px, ~200 MB of 256 px RGB PNGs)


def split_sets(splits) -> dict[str, tuple[ImageSet, np.ndarray | None]]:
    """name → (images, indices into the source's training set, None for the test set) of ``splits``.

    ``public`` is taken before the public shift (``Splits.public_unshifted``).
    """
    public = splits.public_unshifted if splits.public_unshifted is not None else splits.public
    empty = splits.private.subset(np.zeros(0, dtype=np.int64))
    return {"public": (public, splits.public_index), "private": (splits.private, splits.private_index),
            "holdout": (splits.holdout if splits.holdout is not None else empty,
                        splits.holdout_index if splits.holdout_index is not None else np.zeros(0, np.int64)),
            "test": (splits.test, None)}


def write_split(uri: str, name: str, images: ImageSet, index: np.ndarray | None, meta: dict) -> dict:
    """Write one split as shards of ``SHARD_SIZE`` images plus its manifest; return the manifest."""
    stats = []
    for shard, start in enumerate(range(0, len(images), SHARD_SIZE)):
        samples = [{"key": f"{name}-{pos:08d}", "image": images.images[pos], "cls": int(images.labels[pos]),
                    "meta": {"position": pos, "index": None if index is None else int(index[pos]),
                             "source_key": None if images.keys is None else str(images.keys[pos])}}
                   for pos in range(start, min(start + SHARD_SIZE, len(images)))]
        stats.append(write_shard(uri, shard, samples))
    return write_manifest(uri, {"split": name, "class_names": list(images.class_names), **meta}, stats)


def write_prepared(uri: str, splits, cfg: DataConfig) -> dict:
    """Write ``splits`` (a ``splits.Splits``) under ``uri`` as the module docstring describes; return prepared.json."""
    shape = list(splits.private.images.shape[1:])
    meta = {"channels": cfg.channels, "image_shape": shape, "public_shift_applied": False}
    counts = {}
    for name, (images, index) in split_sets(splits).items():
        counts[name] = write_split(storage.join(uri, name), name, images, index, meta)["num_samples"]
    storage.write_json(storage.join(uri, "splits.json"), splits.record())
    skipped = [{"name": s.name, "reason": s.reason} for part in (splits.private, splits.test)
               for s in (part.skipped or [])]
    record = {**meta, "class_names": splits.class_names, "counts": counts, "skipped": skipped,
              "source": cfg.source}
    storage.write_json(storage.join(uri, PREPARED), record)
    return record


def is_prepared(uri: str) -> bool:
    return storage.exists(storage.join(uri, PREPARED))


def read_split(uri: str, name: str, shape: list[int], class_names: list[str]) -> tuple[ImageSet, np.ndarray]:
    """(images in position order, source training-set indices; -1 for the test set) of one prepared split."""
    manifest = read_manifest(storage.join(uri, name))
    images, labels, keys, index = [], [], [], []
    for shard in manifest["shards"]:
        for s in iter_shard(storage.join(uri, name, shard["shard"])):
            if s["meta"]["position"] != len(images):
                raise ValueError(f"{storage.join(uri, name, shard['shard'])}: sample {s['key']} out of order")
            images.append(s["image"])
            labels.append(s["cls"])
            keys.append(s["meta"]["source_key"])
            index.append(-1 if s["meta"]["index"] is None else s["meta"]["index"])
    array = np.stack(images).astype(np.uint8) if images else np.zeros([0, *shape], np.uint8)
    key_array = None if any(k is None for k in keys) else np.array(keys, dtype=str)
    return (ImageSet(array, np.array(labels, dtype=np.int64), list(class_names), key_array),
            np.array(index, dtype=np.int64))


def read_prepared(uri: str, cfg: DataConfig):
    """The ``splits.Splits`` written under ``uri``, with ``cfg.public_shift`` applied to the public images."""
    from synthset.data.splits import Splits, shift_images

    record = storage.read_json(storage.join(uri, PREPARED))
    if record["channels"] != cfg.channels:
        raise ValueError(f"{uri}: prepared with data.channels={record['channels']}, config has {cfg.channels}")
    names, shape = record["class_names"], record["image_shape"]
    sets = {name: read_split(uri, name, shape, names) for name in SPLIT_NAMES}
    original, public_index = sets["public"]
    public = ImageSet(shift_images(original.images, cfg.public_shift), original.labels, original.class_names,
                      original.keys)
    holdout, holdout_index = sets["holdout"]
    has_holdout = len(holdout) > 0
    return Splits(public, sets["private"][0], sets["test"][0], public_index, sets["private"][1], cfg.public_shift,
                  original, holdout if has_holdout else None, holdout_index if has_holdout else None)


def read_record(uri: str) -> dict:
    """``prepared.json`` of a prepared directory (class names, channels, image shape, counts)."""
    return json.loads(storage.read_bytes(storage.join(uri, PREPARED)).decode())
