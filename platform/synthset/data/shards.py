"""The synthetic-dataset contract: WebDataset shards + ``manifest.json`` (see DESIGN.md).

A dataset is a directory/URI holding ``shard-NNNNNN.tar`` files whose members are
``<key>.png`` (or ``.jpg``), ``<key>.cls`` (class index as text), ``<key>.json`` (request and
provenance) and optionally ``<key>.soft.npy`` (Teacher probabilities); a ``_shards/`` folder
with one stats file per complete shard (how resume knows what is done); ``index.wids.json``
(shard list with sample counts, for random access); and ``manifest.json``, written last, only
when every planned shard is complete.

Shards are built in memory with fixed tar headers, so the same samples give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from synthset import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WIDS_INDEX = "index.wids.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 (H, W) or (H, W, C) → PNG/JPEG bytes (deterministic for the same pixels)."""
    buf = io.BytesIO()
    pil = Image.fromarray(image if image.ndim == 2 or image.shape[-1] != 1 else image[..., 0])
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    else:
        pil.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def decode_image(data: bytes, path: str = "<bytes>") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L") if im.mode in ("L", "1", "P", "I;16") else im.convert("RGB"))
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"{path}: corrupt image ({err})") from None


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def build_shard(samples: list[dict], image_format: str = "png") -> memoryview:
    """Tar bytes for ``samples`` (dicts with key, image or image_bytes, cls, meta and optionally soft), as a
    view of the tar built in memory (no second copy)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            key = s["key"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            image_bytes = s["image_bytes"] if "image_bytes" in s else encode_image(s["image"], image_format)
            members = [(f"{key}.{image_format}", image_bytes),
                       (f"{key}.cls", str(int(s["cls"])).encode()),
                       (f"{key}.json", json.dumps(s["meta"], sort_keys=True).encode())]
            if s.get("soft") is not None:
                members.append((f"{key}.soft.npy", _npy_bytes(np.asarray(s["soft"], dtype=np.float32))))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getbuffer()


def write_shard(dataset: str, index: int, samples: list[dict], image_format: str = "png",
                extra_stats: dict | None = None) -> dict:
    """Write one complete shard atomically, then its stats file; return the stats."""
    import hashlib

    data = build_shard(samples, image_format)
    storage.write_bytes(storage.join(dataset, shard_name(index)), data)
    per_class: dict[str, int] = {}
    for s in samples:
        per_class[str(int(s["cls"]))] = per_class.get(str(int(s["cls"])), 0) + 1
    stats = {"shard": shard_name(index), "index": index, "count": len(samples),
             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
             "first_key": samples[0]["key"] if samples else None,
             "last_key": samples[-1]["key"] if samples else None,
             "per_class": per_class, "written_at": time.time(), **(extra_stats or {})}
    storage.write_json(storage.join(dataset, "_shards", shard_name(index) + ".json"), stats)
    return stats


def completed_shards(dataset: str) -> dict[int, dict]:
    """Stats of every shard whose tar and stats file both exist (the resume record)."""
    done = {}
    for path in storage.list_files(storage.join(dataset, "_shards"), ".tar.json"):
        stats = storage.read_json(path)
        if storage.exists(storage.join(dataset, stats["shard"])):
            done[stats["index"]] = stats
    return done


def write_manifest(dataset: str, meta: dict, shard_stats: list[dict]) -> dict:
    """Write ``manifest.json`` (last) from the per-shard stats; returns it."""
    shard_stats = sorted(shard_stats, key=lambda s: s["index"])
    totals: dict[str, int] = {}
    for s in shard_stats:
        for c, n in s["per_class"].items():
            totals[c] = totals.get(c, 0) + n
    manifest = {"schema_version": SCHEMA_VERSION, **meta,
                "shards": [{k: s[k] for k in ("shard", "count", "sha256", "bytes", "first_key", "last_key",
                                                      "seconds", "model_seconds")
                            if k in s} for s in shard_stats],
                "num_samples": sum(s["count"] for s in shard_stats),
                "totals_per_class": {k: totals[k] for k in sorted(totals, key=int)},
                "complete": True, "written_at": time.time()}
    # A wids-style index (shard URLs relative to the index, sample counts) for random access.
    storage.write_json(storage.join(dataset, WIDS_INDEX), {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": meta.get("method", "synthset"),
        "shardlist": [{"url": s["shard"], "nsamples": s["count"]} for s in shard_stats]})
    storage.write_json(storage.join(dataset, MANIFEST), manifest)
    return manifest


def read_manifest(dataset: str) -> dict:
    uri = storage.join(dataset, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no manifest (dataset missing or incomplete)")
    manifest = storage.read_json(uri)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    return manifest


def shard_paths(dataset: str) -> list[str]:
    return [storage.join(dataset, s["shard"]) for s in read_manifest(dataset)["shards"]]


def iter_shard(path: str, decode: bool = True) -> Iterator[dict]:
    """Samples of one shard, grouped by key, in file order: key, image (uint8, or the encoded bytes without
    ``decode``), image_ext, cls, meta and soft when present."""
    data = storage.read_bytes(path)
    current: dict | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            payload = tar.extractfile(info).read()
            if current is None or current["key"] != key:
                if current is not None:
                    yield current
                current = {"key": key}
            if ext in ("png", "jpg", "jpeg"):
                current["image"] = decode_image(payload, f"{path}:{info.name}") if decode else payload
                current["image_ext"] = ext
            elif ext == "cls":
                current["cls"] = int(payload)
            elif ext == "json":
                current["meta"] = json.loads(payload)
            elif ext == "soft.npy":
                current["soft"] = np.load(io.BytesIO(payload), allow_pickle=False)
    if current is not None:
        yield current


def image_to_tensor(image: np.ndarray, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """uint8 (H, W[, C]) → float (C, H, W) in [-1, 1], optionally resized and converted.

    Generators may produce another resolution or colour mode than the classifiers read (SD 2.1
    writes 512 px RGB); ``size`` and ``channels`` bring every image to the classifier's input.
    """
    x = torch.from_numpy(np.array(fitted_image(image, size, channels), copy=True)).float().div(127.5).sub(1.0)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream a shard dataset (synthetic or a prepared split): its samples split across ranks and workers.

    Yields ``(image tensor, cls, soft or empty)``; images stay uint8 (in the shuffle buffer too) until
    the sample is yielded. Every sample goes to exactly one *consumer* (rank × DataLoader worker): whole
    shards, dealt round-robin, when there are at least as many shards as consumers; otherwise every
    consumer reads every shard and keeps every n-th sample (a small dataset on many workers). With
    ``shuffle`` each consumer's shards are read in an order permuted with ``seed + epoch`` and samples
    pass through a shuffle buffer of ``buffer`` samples. ``rank_batches`` says how many batches a rank
    yields per epoch, so data-parallel ranks can stop together.
    """

    def __init__(self, dataset: str, shuffle: bool = False, seed: int = 0, buffer: int = 2000,
                 rank: int = 0, world_size: int = 1, limit: int | None = None,
                 image_size: int | None = None, channels: int | None = None, shift: str = "none"):
        shards = read_manifest(dataset)["shards"]
        self.shift = shift  # data.public_shift of a prepared public split, applied to each image as it is decoded
        self.paths = [storage.join(dataset, s["shard"]) for s in shards]
        self.counts = [s["count"] for s in shards]
        self.image_size, self.channels = image_size, channels
        self.shuffle, self.seed, self.buffer = shuffle, seed, buffer
        self.rank, self.world_size, self.limit = rank, world_size, limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _consumer_shards(self, consumer: int, consumers: int) -> list[tuple[int, int | None]]:
        """(shard, stride start or None for the whole shard) that ``consumer`` of ``consumers`` reads, in order."""
        if len(self.paths) >= consumers:
            mine = list(range(consumer, len(self.paths), consumers))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, consumer]).permutation(len(mine))
                mine = [mine[i] for i in order]
            return [(i, None) for i in mine]
        # Fewer shards than consumers: sample k of the dataset goes to consumer k mod consumers.
        firsts = np.concatenate([[0], np.cumsum(self.counts)])
        return [(i, (consumer - int(firsts[i])) % consumers) for i in range(len(self.paths))]

    def consumer_count(self, consumer: int, consumers: int) -> int:
        """Samples ``consumer`` yields in an epoch (before ``limit``)."""
        total = 0
        for shard, start in self._consumer_shards(consumer, consumers):
            n = self.counts[shard]
            total += n if start is None else len(range(start, n, consumers))
        return total

    def rank_batches(self, rank: int, batch_size: int, workers: int = 0) -> int:
        """Batches a DataLoader (``workers`` processes, 0: in-process) over rank ``rank`` yields per epoch:
        each worker's samples are batched apart, so a rank yields the sum of its workers' batches."""
        per_rank = max(1, workers)
        consumers = self.world_size * per_rank
        counts = [self.consumer_count(rank * per_rank + w, consumers) for w in range(per_rank)]
        if self.limit is not None:  # the limit holds per consumer
            counts = [min(c, self.limit) for c in counts]
        return sum((c + batch_size - 1) // batch_size for c in counts)

    def samples(self) -> Iterator[dict]:
        """This consumer's raw samples (dicts with the decoded uint8 ``image``), unshuffled."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        consumers = self.world_size * workers
        n = 0
        for shard, start in self._consumer_shards(self.rank * workers + worker, consumers):
            for i, s in enumerate(iter_shard(self.paths[shard], decode=False)):
                if start is not None and (i - start) % consumers:
                    continue
                if self.limit is not None and n >= self.limit:
                    return
                n += 1
                s["image"] = decode_image(s["image"], f"{self.paths[shard]}:{s['key']}")
                if self.shift != "none":
                    from synthset.data.splits import shift_images

                    s["image"] = shift_images(s["image"][None], self.shift)[0]
                yield s

    def __iter__(self):
        rng = np.random.default_rng(self.seed + 1000 + self.epoch)
        buf: list[dict] = []
        for s in self.samples():
            if not self.shuffle:
                yield self._item(s)
                continue
            buf.append(s)
            if len(buf) >= self.buffer:
                yield self._item(buf.pop(int(rng.integers(len(buf)))))
        while buf:
            yield self._item(buf.pop(int(rng.integers(len(buf)))))

    def _item(self, s: dict):
        soft = torch.from_numpy(s["soft"]) if "soft" in s else torch.empty(0)
        return image_to_tensor(s["image"], self.image_size, self.channels), s["cls"], soft


def fitted_image(image: np.ndarray, size: int | None = None, channels: int | None = None) -> np.ndarray:
    """uint8 (H, W[, C]) brought to ``size`` and ``channels`` (``image_to_tensor``'s conversion, kept uint8)."""
    if ((size is not None and image.shape[:2] != (size, size)) or (channels == 1 and image.ndim == 3)
            or (channels == 3 and image.ndim == 2)):
        pil = Image.fromarray(image)
        if channels is not None:
            pil = pil.convert("L" if channels == 1 else "RGB")
        if size is not None and pil.size != (size, size):
            pil = pil.resize((size, size), Image.BILINEAR)
        image = np.asarray(pil)
    return image


def read_ray_dataset(dataset: str):
    """The dataset's shards as a Ray Dataset (``ray.data.read_webdataset``), one row per sample."""
    import ray

    paths = shard_paths(dataset)
    if all(storage.is_local(p) for p in paths):
        return ray.data.read_webdataset(paths)
    fs, _ = storage.resolve(paths[0])
    return ray.data.read_webdataset([storage.resolve(p)[1] for p in paths], filesystem=fs)
