"""The prepared real data: a source's splits written once as WebDataset shards, read back on demand.

The prepare stage (``stages/prepare.py``) never holds a split. It works in three steps, each a
plain function here (the stage runs the per-shard ones in parallel):

1. ``plan_prepare``: list the source (``Source.listing``: keys, labels and small refs, no pixels),
   leave out the images that cannot be decoded (``data.on_bad_image: skip``: ``find_bad`` decodes
   them once, in parallel), set the test images aside (``splits.test_rows``) and draw the seeded
   splits on the lists (``splits.draw_splits``). Every split is then a list of refs.
2. ``write_prepared_shard``, one call per output shard of ``SHARD_SIZE`` images: open the source,
   decode, convert to ``data.channels`` and fit to ``data.image_size`` the shard's images (sources
   whose images share one size — Fashion-MNIST, digits — keep that size, as always: the stages fit
   them, so the embedded default's outputs do not change), and write the shard.
3. ``finish_prepared``: the manifests, the small per-split arrays and the records, last.

The layout under one directory::

    public/   private/   holdout/   test/     one WebDataset dataset per split (shards.py contract):
                                              <key>.png, <key>.cls, <key>.json = {"position", "index",
                                              "source_key"}, manifest.json, and arrays.npz (labels,
                                              index, keys of every image, in position order)
    splits.json                               the split record (``Splits.record``): indices, class names
    prepared.json                             what was prepared (channels, image shape, counts), written last

Keys are ``<split>-<position>`` (``private-00000042``) because a shard key may hold neither
``.`` nor ``/``; the source's own key is kept in ``source_key``. ``index`` is the image's index
in the source's training set, as in ``splits.json``. The public split is stored *before*
``data.public_shift``: reading it applies the shift, so the unshifted images need no second copy.

Everything after the prepare stage reads these shards through ``PreparedSplit`` handles
(``read_prepared``): small arrays in memory, images read from the shards a batch at a time.
Plain functions of arrays and paths: no Ray here.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from synthset import storage
from synthset.config import DataConfig
from synthset.data.images import BadImage, fit_images
from synthset.data.shards import decode_image, encode_image, iter_shard, read_manifest, write_manifest, write_shard
from synthset.data.source_base import ArraySource, Listing, SkippedImage, Source
from synthset.data.sources import open_source
from synthset.data.splits import Splits, draw_splits, report_skipped, shift_images, split_record, test_rows

SPLIT_NAMES = ("public", "private", "holdout", "test")
PREPARED = "prepared.json"
ARRAYS = "arrays.npz"
SHARD_SIZE = 1000  # images per shard (a few MB at 32 px, ~200 MB of 256 px RGB PNGs)

# find_bad(part, listing) → {position in the listing: (name, reason)}: the images that cannot be decoded.
FindBad = Callable[[str, Listing], dict[int, tuple[str, str]]]


@dataclass
class SplitPlan:
    """One split to write: where its images come from (``part``'s refs) and what is recorded of them."""

    name: str
    part: str                 # "train" or "test": the source part whose refs these are
    refs: list
    keys: list[str]
    labels: np.ndarray        # int64 (N,)
    index: np.ndarray | None  # indices into the source's training images (None for the test split)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class PreparePlan:
    """What ``plan_prepare`` decided: the class names, each split's images as refs, the skipped images."""

    class_names: list[str]
    splits: dict[str, SplitPlan]
    record: dict                  # splits.json
    image_shape: list[int]        # what every prepared image is: (H, W) or (H, W, 3)
    size: int | None              # what images are fitted to (None: the source's own size)
    skipped: list[SkippedImage] = field(default_factory=list)
    in_process: bool = False      # the source's images are arrays in this process (Fashion-MNIST, digits)
    source: Source | None = field(default=None, repr=False)  # the open source, for writing in this process


def check_refs(source: Source, refs: list, size: int | None) -> dict[int, tuple[str, str]]:
    """{i: (name, reason)} for every ``refs[i]`` that cannot be decoded (one pass of ``find_bad``)."""
    bad = {}
    for i, ref in enumerate(refs):
        try:
            source.read_ref(ref, size)
        except BadImage as err:
            bad[i] = (err.name, err.reason)
    return bad


def _decodable(source: Source, part: str, listed: Listing, find_bad: FindBad | None,
               skipped: list[tuple[int, SkippedImage]]) -> Listing:
    """``listed`` less the images ``find_bad`` cannot decode (``on_bad_image: skip``), which join ``skipped``."""
    if source.on_bad_image == "error" or find_bad is None:
        return listed
    bad = find_bad(part, listed)
    if not bad:
        return listed
    skipped += [(i, SkippedImage(*bad[i])) for i in sorted(bad)]
    return listed.take([i for i in range(len(listed)) if i not in bad])


def plan_prepare(cfg: DataConfig, find_bad: FindBad | None = None, source: Source | None = None) -> PreparePlan:
    """List ``cfg``'s source and draw its splits without keeping a single image (see the module docstring).

    ``find_bad``: under ``on_bad_image: skip``, what finds the images that cannot be decoded (the stage
    passes a parallel one; None: ``check_refs`` here). Under ``error`` a bad image fails when its shard is
    written, naming the file. Errors that need no decoding (a missing folder, an empty class, a bad label,
    split sizes) are raised here, before anything is written.
    """
    source = source or open_source(cfg)
    size = None if source.native_size else cfg.image_size
    find_bad = find_bad or (lambda part, listed: check_refs(source, listed.refs, size))
    parts = {}
    skipped: dict[str, list] = {}
    for part in source.parts:
        listed = source.listing(part)
        skipped[part] = list(listed.skipped)
        parts[part] = _decodable(source, part, listed, find_bad, skipped[part])
        skipped[part] = [s for _, s in sorted(skipped[part], key=lambda t: t[0])]
    train = parts["train"]
    if "test" in parts:
        test = parts["test"]
    else:
        in_test = test_rows(train.keys, cfg.test_fraction)
        test, train = train.take(in_test), train.take(~in_test)
    for part, listed in (("train", train), ("test", test)):
        if len(listed) == 0:
            why = skipped.get(part) or []
            raise ValueError(f"{type(source).__name__}: no usable images in the {part!r} part"
                             + (f" ({len(why)} skipped)" if why else ""))
    names = source.class_names
    _check_classes(names, train.labels, test.labels, "test" in parts)
    pub, priv, held = draw_splits(cfg, train.labels, names)
    def pick(name, rows):
        chosen = train.take(rows)
        return SplitPlan(name, "train", chosen.refs, chosen.keys, chosen.labels, rows)

    splits = {"public": pick("public", pub), "private": pick("private", priv), "holdout": pick("holdout", held),
              "test": SplitPlan("test", "test" if "test" in parts else "train", test.refs, test.keys, test.labels,
                                None)}
    record = split_record(names, pub, train.labels[pub], priv, held if len(held) else None, cfg.public_shift)
    if size is None:
        shape = list(source.native_size) + ([3] if cfg.channels == 3 else [])
    else:
        shape = [size, size] + ([3] if cfg.channels == 3 else [])
    all_skipped = [s for part in source.parts for s in skipped[part]]
    report_skipped(all_skipped)
    in_process = isinstance(source, ArraySource)
    return PreparePlan(names, splits, record, shape, size, all_skipped, in_process, source if in_process else None)


def _check_classes(names: list[str], train_labels: np.ndarray, test_labels: np.ndarray, own_test: bool) -> None:
    """A class without a single training image fails here, saying why: no split size can fix it."""
    in_train = np.bincount(train_labels, minlength=len(names))
    in_test = np.bincount(test_labels, minlength=len(names))
    empty = [c for c in range(len(names)) if in_train[c] == 0]
    if not empty:
        return
    listed = ", ".join(f"{names[c]!r} ({in_test[c]} test image(s))" for c in empty)
    if own_test:
        raise ValueError(f"data.path: no training images of class(es) {listed}; add images of them to data.path")
    raise ValueError(f"data.path: no training images of class(es) {listed}: every image of them falls in the test "
                     "set, which data.test_fraction picks by a hash of each file's name, so no split size can fix it; "
                     "add images of the class, or give the test images in data.test_path")


def shard_specs(plan: PreparePlan) -> list[dict]:
    """One task per output shard: {split, shard, start, part, refs, keys, labels, index}, plain data."""
    specs = []
    for name in SPLIT_NAMES:
        split = plan.splits[name]
        for shard, start in enumerate(range(0, len(split), SHARD_SIZE)):
            stop = min(start + SHARD_SIZE, len(split))
            specs.append({"split": name, "shard": shard, "start": start, "part": split.part,
                          "refs": split.refs[start:stop], "keys": split.keys[start:stop],
                          "labels": split.labels[start:stop].tolist(),
                          "index": None if split.index is None else split.index[start:stop].tolist()})
    return specs


def write_prepared_shard(uri: str, spec: dict, source: Source, size: int | None) -> dict:
    """Decode, convert and fit one shard's images (``spec`` from ``shard_specs``) and write the shard; its stats.

    A bad image raises ``BadImage`` naming it (with ``on_bad_image: skip`` the plan has left them out).
    """
    samples = []
    for i, (ref, key, label) in enumerate(zip(spec["refs"], spec["keys"], spec["labels"])):
        pos = spec["start"] + i
        # Encoded at once (the bytes ``build_shard`` would make): the shard holds PNGs, never the pixels.
        image_bytes = encode_image(source.read_ref(ref, size))
        samples.append({"key": f"{spec['split']}-{pos:08d}", "image_bytes": image_bytes, "cls": int(label),
                        "meta": {"position": pos, "index": None if spec["index"] is None else int(spec["index"][i]),
                                 "source_key": key}})
    return {"split": spec["split"], **write_shard(storage.join(uri, spec["split"]), spec["shard"], samples)}


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def finish_prepared(uri: str, plan: PreparePlan, cfg: DataConfig, stats: list[dict]) -> dict:
    """The manifests and arrays of every split, ``splits.json`` and ``prepared.json`` (last); returns the latter."""
    meta = {"channels": cfg.channels, "image_shape": plan.image_shape, "public_shift_applied": False}
    counts = {}
    for name in SPLIT_NAMES:
        split = plan.splits[name]
        split_uri = storage.join(uri, name)
        mine = [s for s in stats if s["split"] == name]
        manifest = write_manifest(split_uri, {"split": name, "class_names": list(plan.class_names), **meta},
                                  [{k: v for k, v in s.items() if k != "split"} for s in mine])
        if manifest["num_samples"] != len(split):
            raise RuntimeError(f"prepare: {manifest['num_samples']} {name} images written, {len(split)} planned")
        index = np.full(len(split), -1, np.int64) if split.index is None else np.asarray(split.index, np.int64)
        storage.write_bytes(storage.join(split_uri, ARRAYS), _npz_bytes(
            labels=np.asarray(split.labels, np.int64), index=index, keys=np.asarray(split.keys, dtype=str)))
        counts[name] = manifest["num_samples"]
    storage.write_json(storage.join(uri, "splits.json"), plan.record)
    record = {**meta, "class_names": plan.class_names, "counts": counts,
              "skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped], "source": cfg.source}
    storage.write_json(storage.join(uri, PREPARED), record)
    return record


def is_prepared(uri: str) -> bool:
    return storage.exists(storage.join(uri, PREPARED))


def read_record(uri: str) -> dict:
    """``prepared.json`` of a prepared directory (class names, channels, image shape, counts)."""
    return json.loads(storage.read_bytes(storage.join(uri, PREPARED)).decode())


class PreparedSplit:
    """One prepared split: its small arrays in memory, its images read from its shards on demand.

    ``labels``, ``index`` (into the source's training images; -1 for the test split) and ``keys`` (the
    source's own keys) have one entry per image, in position order. ``read(rows, size)`` decodes just
    the given rows (random access through the shards' counts: each needed shard is read once);
    ``chunks(rows, size)`` streams them a shard at a time. ``shift``: ``data.public_shift``, applied to
    every image read (the public split only). Nothing here keeps images after returning them.
    """

    def __init__(self, uri: str, name: str, class_names: list[str], channels: int, image_shape: list[int],
                 shift: str = "none"):
        self.uri, self.name, self.class_names, self.channels = uri, name, list(class_names), channels
        self.image_shape, self.shift = list(image_shape), shift
        manifest = read_manifest(uri)
        self.shards = [s["shard"] for s in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum([s["count"] for s in manifest["shards"]])]).astype(np.int64)
        self.labels, self.index, self.keys = self._arrays()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        path = storage.join(self.uri, ARRAYS)
        if storage.exists(path):
            with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
                return z["labels"], z["index"], z["keys"]
        # Prepared before arrays.npz existed: the labels and records of the shards (no image is decoded).
        labels, index, keys = [], [], []
        for shard in self.shard_uris:
            for s in iter_shard(shard, decode=False):
                labels.append(s["cls"])
                index.append(-1 if s["meta"]["index"] is None else s["meta"]["index"])
                keys.append(s["meta"]["source_key"])
        key_array = None if any(k is None for k in keys) else np.asarray(keys, dtype=str)
        return np.asarray(labels, np.int64), np.asarray(index, np.int64), key_array

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s) for s in self.shards]

    @property
    def image_bytes(self) -> int:
        """Bytes of one stored image (uint8)."""
        return int(np.prod(self.image_shape))

    def _empty(self, size: int | None) -> np.ndarray:
        shape = self.image_shape if size is None else [size, size, *self.image_shape[2:]]
        return np.zeros([0, *shape], np.uint8)

    def _finish(self, images: list[np.ndarray], size: int | None) -> np.ndarray:
        if not images:
            return self._empty(size)
        out = shift_images(np.stack(images), self.shift)
        return out if size is None else fit_images(out, size)

    def chunks(self, rows=None, size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, uint8 images fitted to ``size``) a shard at a time, in position order; ``rows``: sorted
        positions (None: all). Only the shards holding a row are read, only those rows decoded."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        if len(rows) and (np.any(np.diff(rows) < 0) or rows[0] < 0 or rows[-1] >= len(self)):
            raise ValueError(f"{self.uri}: rows must be sorted positions in 0..{len(self) - 1}")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for shard in np.unique(which):
            mine = rows[which == shard]
            wanted = set((mine - self.offsets[shard]).tolist())
            path = self.shard_uris[shard]
            images = [decode_image(s["image"], f"{path}:{s['key']}")
                      for i, s in enumerate(iter_shard(path, decode=False)) if i in wanted]
            yield mine, self._finish(images, size)

    def read(self, rows=None, size: int | None = None) -> np.ndarray:
        """uint8 images of ``rows`` (any order, repeats allowed; None: all) fitted to ``size``."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        unique, inverse = np.unique(rows[order], return_inverse=True)
        parts = [images for _, images in self.chunks(unique, size)]
        if not parts:
            return self._empty(size)
        stacked = np.concatenate(parts)
        out = np.empty_like(stacked[:0], shape=(len(rows), *stacked.shape[1:]))
        out[order] = stacked[inverse]
        return out

    def batches(self, batch_size: int, rows=None, size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, images) in batches of ``batch_size`` in position order (a partial last batch)."""
        pending_rows, pending = [], []
        for rows_chunk, images in self.chunks(rows, size):
            pending_rows.append(rows_chunk)
            pending.append(images)
            while sum(len(r) for r in pending_rows) >= batch_size:
                r, x = np.concatenate(pending_rows), np.concatenate(pending)
                yield r[:batch_size], x[:batch_size]
                pending_rows, pending = [r[batch_size:]], [x[batch_size:]]
        if pending_rows and sum(len(r) for r in pending_rows):
            yield np.concatenate(pending_rows), np.concatenate(pending)

    def unshifted(self) -> "PreparedSplit":
        """The same split read without ``shift`` (the public images as stored)."""
        other = object.__new__(PreparedSplit)
        other.__dict__.update(self.__dict__)
        other.shift = "none"
        return other


def read_prepared(uri: str, cfg: DataConfig) -> Splits:
    """The ``splits.Splits`` written under ``uri`` as ``PreparedSplit`` handles (no image is read here);
    the public handle applies ``cfg.public_shift``."""
    record = read_record(uri)
    if record["channels"] != cfg.channels:
        raise ValueError(f"{uri}: prepared with data.channels={record['channels']}, config has {cfg.channels}")
    names, shape = record["class_names"], record["image_shape"]
    handle = lambda name, shift="none": PreparedSplit(storage.join(uri, name), name, names, cfg.channels, shape,
                                                      shift)
    public, private, holdout, test = (handle("public", cfg.public_shift), handle("private"), handle("holdout"),
                                      handle("test"))
    has_holdout = len(holdout) > 0
    return Splits(public, private, test, public.index, private.index, cfg.public_shift, public.unshifted(),
                  holdout if has_holdout else None, holdout.index if has_holdout else None)
