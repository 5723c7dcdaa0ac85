"""Replication gate: is a synthetic image a copy of a private training image?

For every synthetic image, its nearest private image under one of two similarities:

* ``tiled_l2`` (pixels; Carlini et al. 2023, "Extracting Training Data from Diffusion Models"):
  both images are cut into non-overlapping ``tile`` × ``tile`` tiles; each tile pair gets its RMS
  distance ‖a_t − b_t‖₂ / √(pixels per tile) on [0, 1] intensities, and the image distance is the
  **max** over tiles (default) or the mean. *Max* is the conservative choice of Carlini et al.:
  a pair counts as close only if *every* tile matches, so two unrelated images that share a large
  uniform background (most of a Fashion-MNIST image is black) are not called copies, while a copy
  with small perturbations everywhere is. It does not flag a copy of only *part* of an image (the
  unmatched tiles dominate the max); ``reduce="mean"`` equals the whole-image RMS distance. Partial
  and semantic copies are the job of the second similarity:
* ``cosine`` in an encoder's feature space (Somepalli et al. 2023 use SSCD copy-detection features;
  here any ``feature_fn`` images → features, e.g. a classifier's ``.embed`` or DINOv2).

Calibration (``calibrate_threshold``): the threshold comes from the private set itself — for each
private image, the similarity to its nearest *other* private image; the threshold is the
``quantile`` (default 0.01) of those distances (for cosine, the 1 − ``quantile`` quantile of the
similarities). A synthetic image is a copy when it is closer to a private image than 99% of private
images are to their own nearest neighbour — i.e. closer than natural near-duplicates in the data.

Everything is chunked (queries × references in blocks, torch matmuls, running minimum), so 1M
synthetic × 30k private images never materialise a full distance matrix; pass ``device="cuda"``
to run the matmuls on a GPU. ``replication_gate`` streams (keys, images) batches, e.g. read from
the synthetic shards, and ``write_audit`` writes one CSV or JSONL row per synthetic image.

For large private sets, ``index="faiss"`` replaces the exact search by a faiss IVF index
(``eval/replication_index.py``, which says what it can miss): for cosine its nearest neighbour, for
tiled_l2 its candidates (block-averaged images) re-ranked with the exact tiled distance
(``nearest_tiled_l2_among``). The exact search stays the default and the index's test reference.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np

from synthset.eval.replication_index import IndexParams, PrivateIndex, candidate_vectors, unit_features

Metric = Literal["tiled_l2", "cosine"]


def as_unit_images(images, name: str = "images") -> np.ndarray:
    """uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1] → float32 (N, C, H, W) in [0, 1].

    uint8 arrays are channels-last (as stored in shards); float arrays are the models' layout.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"{name}: uint8 images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32) / 255.0
    if x.ndim != 4:
        raise ValueError(f"{name}: float images must be (N, C, H, W) in [-1, 1], got shape {x.shape}")
    return ((x.astype(np.float32) + 1.0) / 2.0).clip(0.0, 1.0)


def to_tiles(x: np.ndarray, tile: int) -> np.ndarray:
    """(N, C, H, W) → (N, T, C·tile·tile): non-overlapping tiles in row-major order (H, W divisible by ``tile``)."""
    n, c, h, w = x.shape
    if tile < 1 or h % tile or w % tile:
        raise ValueError(f"tile: {tile} must be >= 1 and divide the image size {h}×{w}")
    t = x.reshape(n, c, h // tile, tile, w // tile, tile).transpose(0, 2, 4, 1, 3, 5)
    return t.reshape(n, (h // tile) * (w // tile), c * tile * tile)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _unit(images) -> np.ndarray:
    """A reference chunk in the [0, 1] float layout of ``nearest_tiled_l2``: uint8 (stored) images are converted,
    float ones are taken as already there."""
    images = np.asarray(images)
    return as_unit_images(images, "reference") if images.dtype == np.uint8 else images.astype(np.float32, copy=False)


class Chunks:
    """A reference set (images or features) kept outside the computing process as chunks: ``parts[k]`` is
    what ``load`` turns into chunk k (an array slice, a ``.npy`` path, a Ray object ref), ``sizes[k]`` its
    rows. Iterating yields (offset of the chunk's first row, array), one chunk in memory at a time."""

    def __init__(self, parts: list, sizes: list[int], load: Callable = lambda part: part):
        self.parts, self.sizes, self.load = list(parts), [int(n) for n in sizes], load

    @classmethod
    def of(cls, array: np.ndarray, chunk: int) -> "Chunks":
        """An in-memory array seen as chunks of ``chunk`` rows (views, no copy)."""
        spans = list(_blocks(len(array), max(1, chunk)))
        return cls([array[a:b] for a, b in spans], [b - a for a, b in spans])

    def __len__(self) -> int:
        return sum(self.sizes)

    def __iter__(self):
        offset = 0
        for part, n in zip(self.parts, self.sizes):
            yield offset, self.load(part)
            offset += n

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of the whole set as one array, loading only the chunks that hold some."""
        rows, out, offset = np.asarray(rows, dtype=np.int64), [], 0
        if not len(rows) or (np.diff(rows) <= 0).any() or rows[0] < 0 or rows[-1] >= len(self):
            raise ValueError(f"rows: must be sorted, unique, in [0, {len(self)}) and at least one")
        for part, n in zip(self.parts, self.sizes):
            picked = rows[(rows >= offset) & (rows < offset + n)] - offset
            if len(picked):
                out.append(np.asarray(self.load(part))[picked])
            offset += n
        return np.concatenate(out)


# The (tiles × queries × references) float32 distance block of ``nearest_tiled_l2`` stays under this many bytes,
# and so do the candidate images ``nearest_tiled_l2_among`` gathers at once; it takes their differences from the
# queries PAIR_BYTES at a time (cache-sized: in numpy, 8 queries × 32 candidates at a time, 256 queries at 32 px RGB
# took 30–100 ms; in torch, in one 100 MB block, 230–890 ms; 2-core machine under load, 1 or 2 threads).
BLOCK_BYTES = 64 * 2 ** 20
PAIR_BYTES = 4 * 2 ** 20


def nearest_tiled_l2(queries: np.ndarray, reference, tile: int, reduce: Literal["max", "mean"] = "max",
                     chunk: int = 1024, exclude_self: bool = False, device: str = "cpu",
                     query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference image of every query under the tiled RMS distance (see the module docstring).

    ``queries`` (M, C, H, W) float in [0, 1] (``as_unit_images``); ``reference``: the same, or a ``Chunks``
    of uint8/float images loaded one chunk at a time. ``exclude_self``: queries *are* the reference (same
    order) and an image is not its own neighbour; ``query_rows``: more generally, each query's own row in
    the reference (excluded). Returns (index (M,) int64, distance (M,) float32). Per reference chunk and
    per block of queries and references (``chunk`` at most, and at most ``BLOCK_BYTES`` of distances): per
    tile one matmul, then the max (or mean) over tiles and a running minimum.
    """
    import torch

    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: must be 'max' or 'mean' (got {reduce!r})")
    if not isinstance(reference, Chunks):
        reference = np.asarray(reference)
        if queries.shape[1:] != reference.shape[1:]:
            raise ValueError(f"queries: image shape {queries.shape[1:]} differs from the reference's "
                             f"{reference.shape[1:]}")
        reference = Chunks.of(reference, len(reference) or 1)
    if exclude_self:
        if len(queries) != len(reference):
            raise ValueError("exclude_self: queries and reference must be the same images")
        query_rows = np.arange(len(queries))
    if len(reference) < (2 if query_rows is not None else 1):
        raise ValueError("reference: needs at least one image (two with exclude_self)")
    q_all = torch.from_numpy(to_tiles(np.ascontiguousarray(queries, dtype=np.float32), tile)).to(device)
    q_all = q_all.transpose(0, 1)  # (T, M, D)
    tiles, dim = q_all.shape[0], q_all.shape[-1]
    q_sq_all = (q_all ** 2).sum(-1)
    side = max(1, min(chunk, int((BLOCK_BYTES / (4 * tiles)) ** 0.5)))
    run_d = torch.full((len(queries),), float("inf"), device=device)
    run_i = torch.zeros(len(queries), dtype=torch.long, device=device)
    own = None if query_rows is None else torch.as_tensor(np.asarray(query_rows), device=device)
    for offset, ref_chunk in reference:
        ref_unit = _unit(ref_chunk)
        if ref_unit.shape[1:] != queries.shape[1:]:
            raise ValueError(f"queries: image shape {queries.shape[1:]} differs from the reference's "
                             f"{ref_unit.shape[1:]}")
        for r0, r1 in _blocks(len(ref_unit), side):
            ref = torch.from_numpy(to_tiles(ref_unit[r0:r1], tile)).to(device).transpose(0, 1).contiguous()
            ref_sq = (ref ** 2).sum(-1)  # (T, n)
            for q0, q1 in _blocks(len(queries), side):
                q, q_sq = q_all[:, q0:q1], q_sq_all[:, q0:q1]
                sq = torch.baddbmm(q_sq[:, :, None] + ref_sq[:, None, :], q, ref.transpose(1, 2), alpha=-2)
                if reduce == "max":  # clamp, /dim and sqrt are monotonic: take the max first, on one (m, n) matrix
                    d = sq.amax(0).clamp_min_(0).div_(dim).sqrt_()
                else:
                    d = sq.clamp_min_(0).div_(dim).sqrt_().mean(0)  # mean of the per-tile RMS
                if own is not None:
                    rows = own[q0:q1] - (offset + r0)
                    hit = (rows >= 0) & (rows < r1 - r0)
                    d[hit.nonzero()[:, 0], rows[hit]] = float("inf")
                m_d, m_i = d.min(1)
                better = m_d < run_d[q0:q1]
                run_d[q0:q1] = torch.where(better, m_d, run_d[q0:q1])
                run_i[q0:q1] = torch.where(better, m_i + offset + r0, run_i[q0:q1])
    return run_i.cpu().numpy().astype(np.int64), run_d.cpu().numpy().astype(np.float32)


def nearest_tiled_l2_among(queries: np.ndarray, reference: Chunks, candidates: np.ndarray, tile: int,
                           reduce: Literal["max", "mean"] = "max",
                           to_unit: Callable = _unit) -> tuple[np.ndarray, np.ndarray]:
    """Nearest of each query's *candidate* reference images under the tiled RMS distance: how the gate re-ranks
    what its index proposes (``eval/replication_index.py``).

    ``queries`` (M, C, H, W) float in [0, 1]; ``reference``: a ``Chunks`` of reference images, of which only the
    chunks holding candidates are loaded and only the candidates' rows converted by ``to_unit`` (default: uint8
    stored images → [0, 1], float taken as is); ``candidates`` (M, K) reference rows, −1 for none, at least one
    per query. Returns (index (M,) int64, distance (M,) float32) as ``nearest_tiled_l2`` would over those rows;
    ties go to the lowest row. Each pair is computed as ‖a_t − b_t‖ directly (not through |a|² + |b|² − 2a·b, so a
    distance may differ from the exact search's in the last float32 digits), in numpy on one CPU thread, a few
    MB of differences at a time: the work is memory-bound, K pairs per query instead of the reference set, and
    torch's threads only contended for a busy CPU here (docs/benchmarks.md).
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: must be 'max' or 'mean' (got {reduce!r})")
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or len(candidates) != len(queries):
        raise ValueError(f"candidates: expected ({len(queries)}, K) rows, got shape {candidates.shape}")
    if len(candidates) and (candidates.max(1) < 0).any():
        raise ValueError("candidates: every query needs at least one candidate row")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, c, h, w = queries.shape
    pair_bytes = 4 * c * h * w * max(1, candidates.shape[1])
    out_i, out_d = np.zeros(n, np.int64), np.zeros(n, np.float32)
    for q0, q1 in _blocks(n, max(1, BLOCK_BYTES // pair_bytes)):
        cand = np.sort(candidates[q0:q1], axis=1)  # −1 first, then ascending rows: ties go to the lowest row
        rows = np.unique(cand[cand >= 0])
        stored = reference.take(rows)  # as stored (uint8 for the stage): converted below, a few pairs at a time
        pos = np.searchsorted(rows, np.maximum(cand, rows[0]))
        q = to_tiles(queries[q0:q1], tile)
        d = np.empty(cand.shape, np.float32)
        for s0, s1 in _blocks(len(cand), max(1, PAIR_BYTES // pair_bytes)):
            b, k = s1 - s0, cand.shape[1]
            images = to_unit(stored[pos[s0:s1]].reshape(b * k, *stored.shape[1:]))
            if images.shape[1:] != queries.shape[1:]:
                raise ValueError(f"queries: image shape {queries.shape[1:]} differs from the reference's "
                                 f"{images.shape[1:]}")
            diff = to_tiles(images, tile).reshape(b, k, -1, c * tile * tile) - q[s0:s1, None]
            mse = np.einsum("bktd,bktd->bkt", diff, diff) / np.float32(c * tile * tile)  # (queries, K, tiles)
            d[s0:s1] = np.sqrt(mse.max(-1)) if reduce == "max" else np.sqrt(mse).mean(-1)
        d[cand < 0] = np.inf
        best = d.argmin(1)  # the first minimum: the lowest row among equals
        out_i[q0:q1] = cand[np.arange(len(cand)), best]
        out_d[q0:q1] = d[np.arange(len(cand)), best]
    return out_i, out_d


def _unit_rows(features, name: str):
    import torch

    f = torch.as_tensor(features).float()
    if f.ndim != 2:
        raise ValueError(f"{name}: features must be (N, F), got shape {tuple(f.shape)}")
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_cosine(query_features, reference_features, chunk: int = 4096, exclude_self: bool = False,
                   device: str = "cpu", query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Most cosine-similar reference row of every query row: (index (M,) int64, similarity (M,) float32).

    ``reference_features``: (N, F), or a ``Chunks`` of them; ``exclude_self``/``query_rows`` as for
    ``nearest_tiled_l2``."""
    import torch

    q_all = _unit_rows(query_features, "query_features")
    if not isinstance(reference_features, Chunks):
        reference_features = Chunks.of(np.asarray(reference_features), chunk)
    if exclude_self:
        if len(q_all) != len(reference_features):
            raise ValueError("exclude_self: queries and reference must be the same rows")
        query_rows = np.arange(len(q_all))
    own = None if query_rows is None else torch.as_tensor(np.asarray(query_rows), device=device)
    run_s = torch.full((len(q_all),), -float("inf"), device=device)
    run_i = torch.zeros(len(q_all), dtype=torch.long, device=device)
    for offset, part in reference_features:
        ref_all = _unit_rows(part, "reference_features").to(device)
        if q_all.shape[1] != ref_all.shape[1]:
            raise ValueError(f"query_features: {q_all.shape[1]} dims, reference_features: {ref_all.shape[1]}")
        for r0, r1 in _blocks(len(ref_all), chunk):
            ref = ref_all[r0:r1]
            for q0, q1 in _blocks(len(q_all), chunk):
                s = q_all[q0:q1].to(device) @ ref.T
                if own is not None:
                    rows = own[q0:q1] - (offset + r0)
                    hit = (rows >= 0) & (rows < r1 - r0)
                    s[hit.nonzero()[:, 0], rows[hit]] = -float("inf")
                m_s, m_i = s.max(1)
                better = m_s > run_s[q0:q1]
                run_s[q0:q1] = torch.where(better, m_s, run_s[q0:q1])
                run_i[q0:q1] = torch.where(better, m_i + offset + r0, run_i[q0:q1])
    return run_i.cpu().numpy().astype(np.int64), run_s.cpu().numpy().astype(np.float32)


def batched_features(feature_fn: Callable, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``feature_fn`` over ``images`` in batches; it may return numpy or torch (N, F)."""
    import torch

    out = []
    with torch.no_grad():
        for b0, b1 in _blocks(len(images), batch_size):
            f = feature_fn(images[b0:b1])
            out.append(f.detach().float().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def calibrate_threshold(nn_scores: np.ndarray, metric: Metric, quantile: float = 0.01) -> float:
    """Copy threshold from the private set's own nearest-neighbour scores (see the module docstring).

    ``nn_scores``: each private image's distance (``tiled_l2``) or similarity (``cosine``) to its
    nearest other private image. Returns the ``quantile`` of the distances, or the 1 − ``quantile``
    quantile of the similarities (linear interpolation, numpy's default).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile: must lie in (0, 1) (got {quantile})")
    nn_scores = np.asarray(nn_scores, dtype=np.float64)
    if nn_scores.ndim != 1 or len(nn_scores) < 2:
        raise ValueError("nn_scores: need a 1-d array of at least 2 nearest-neighbour scores")
    if metric == "tiled_l2":
        return float(np.quantile(nn_scores, quantile))
    if metric == "cosine":
        return float(np.quantile(nn_scores, 1 - quantile))
    raise ValueError(f"metric: must be 'tiled_l2' or 'cosine' (got {metric!r})")


@dataclass
class ReplicationResult:
    """Per synthetic image: its key, nearest private index, score and verdict; plus the threshold used.

    ``score`` is a distance for ``tiled_l2`` (lower = closer; copy if ≤ threshold) and a cosine
    similarity for ``cosine`` (higher = closer; copy if ≥ threshold).
    """

    metric: str
    threshold: float
    keys: list[str]
    real_index: np.ndarray
    score: np.ndarray
    is_copy: np.ndarray

    @property
    def copies(self) -> int:
        return int(self.is_copy.sum())

    def rows(self) -> Iterable[dict]:
        for k, i, s, c in zip(self.keys, self.real_index, self.score, self.is_copy):
            yield {"key": k, "real_index": int(i), "metric": self.metric, "score": float(s), "is_copy": bool(c)}

    def summary(self) -> dict:
        n = len(self.keys)
        return {"metric": self.metric, "threshold": self.threshold, "images": n, "copies": self.copies,
                "copy_fraction": self.copies / n if n else 0.0,
                "score_mean": float(self.score.mean()) if n else float("nan")}


def _gate_unit(images) -> np.ndarray:
    """The gate's input layouts (uint8 channels-last, or float (N, C, H, W) in [-1, 1]) → float in [0, 1]."""
    return as_unit_images(images, "real_images")


class ReplicationGate:
    """Calibrated nearest-neighbour copy detector against a private image set.

    ``ReplicationGate(real_images, metric="tiled_l2", tile=8)`` or
    ``ReplicationGate(real_images, metric="cosine", feature_fn=model.embed)``; then ``check(keys,
    images)`` per batch. ``real_images``: uint8 (N, H, W[, C]) or float (N, C, H, W) in [-1, 1], or a
    ``Chunks`` of such images kept outside this process (the stage's object-store or file chunks: the
    private set is then never whole in memory, only one chunk at a time); ``feature_fn`` receives float
    (B, C, H, W) in [-1, 1] torch tensors (the models' input). ``real_index`` maps rows of ``real_images``
    to the indices reported (default: 0..N−1). ``threshold`` overrides the calibration;
    ``calibration_size`` subsamples the private images used to calibrate (seeded), for very large private
    sets, and ``calibration`` may give those images as ``Chunks`` (rows ``calibration_rows``), so that they
    too stay out of memory.

    ``index``: "exact" (default: every private image is compared), "faiss" (an IVF index over the private set,
    ``eval/replication_index.py``, built here with ``index_params`` when the set has at least
    ``index_params.min_private`` images, else exact), or a ``PrivateIndex`` built elsewhere over these same
    images (the stage's driver builds it once and its pool actors load it). The calibration stays exact.
    """

    def __init__(self, real_images, metric: Metric = "tiled_l2", tile: int = 8,
                 reduce: Literal["max", "mean"] = "max", feature_fn: Callable | None = None,
                 quantile: float = 0.01, threshold: float | None = None, real_index: np.ndarray | None = None,
                 calibration_size: int | None = None, seed: int = 0, chunk: int = 1024, device: str = "cpu",
                 calibration: Chunks | None = None, index="exact", index_params: IndexParams | None = None):
        if metric not in ("tiled_l2", "cosine"):
            raise ValueError(f"metric: must be 'tiled_l2' or 'cosine' (got {metric!r})")
        if metric == "cosine" and feature_fn is None:
            raise ValueError("feature_fn: required for metric='cosine'")
        self.metric, self.tile, self.reduce, self.feature_fn = metric, tile, reduce, feature_fn
        self.chunk, self.device = chunk, device
        if not (isinstance(index, PrivateIndex) or index in ("exact", "faiss")):
            raise ValueError(f"index: must be 'exact', 'faiss' or a PrivateIndex (got {index!r})")
        if isinstance(real_images, Chunks):
            self.real = real_images
        else:
            array = np.asarray(real_images)
            as_unit_images(array[:1], "real_images")  # the shape check, before anything else
            self.real = Chunks.of(array, chunk)
        self.stored = self.real  # as given: the index's re-ranking converts only the rows it reads
        # The gate's images (uint8, or float in [-1, 1]) become [0, 1] floats a chunk at a time.
        self.real = Chunks(self.real.parts, self.real.sizes, lambda part, load=self.real.load: _gate_unit(load(part)))
        n = len(self.real)
        if n < 2:
            raise ValueError("real_images: need at least 2 private images")
        self.real_index = np.arange(n) if real_index is None else np.asarray(real_index)
        if self.real_index.shape != (n,):
            raise ValueError(f"real_index: expected shape ({n},), got {self.real_index.shape}")
        self.image_shape = next(iter(self.real))[1].shape[1:]
        self.real_features = None
        # Features are small (N × F): computed once, a chunk of images at a time — unless a given index and a
        # given threshold leave nothing to use them for (the stage's pool actors).
        if metric == "cosine" and not (isinstance(index, PrivateIndex) and threshold is not None):
            self.real_features = np.concatenate([self._features(c) for _, c in self.real])
        if threshold is None:
            self.nn_scores = self.private_nn_scores(calibration_size, seed, calibration)
            threshold = calibrate_threshold(self.nn_scores, metric, quantile)
        self.threshold = float(threshold)
        self.index = index if isinstance(index, PrivateIndex) else None
        params = index_params or IndexParams()
        if index == "faiss" and n >= params.min_private:
            self.index = self.build_index(params)
        if self.index is not None and (len(self.index) != n or self.index.metric != metric):
            raise ValueError(f"index: a {self.index.metric} index of {len(self.index)} vectors for {n} private "
                             f"images and metric {metric}")

    def build_index(self, params: IndexParams) -> PrivateIndex:
        """The faiss index over this gate's private set (``eval/replication_index.py``), a chunk at a time."""
        if self.metric == "cosine":
            return PrivateIndex.build(Chunks.of(unit_features(self.real_features), self.chunk), "cosine", params)
        vectors = Chunks(self.real.parts, self.real.sizes,
                         lambda part, load=self.real.load: candidate_vectors(load(part), params.grid))
        return PrivateIndex.build(vectors, "tiled_l2", params)

    def _features(self, unit_images: np.ndarray) -> np.ndarray:
        import torch

        fn = lambda x: self.feature_fn(torch.from_numpy(x * 2.0 - 1.0))
        return batched_features(fn, unit_images, self.chunk)

    @staticmethod
    def calibration_rows(n: int, calibration_size: int | None = None, seed: int = 0) -> np.ndarray:
        """The private rows the threshold is calibrated on: all, or a seeded sorted sample of ``calibration_size``."""
        rows = np.arange(n)
        if calibration_size is not None and calibration_size < n:
            rows = np.sort(np.random.default_rng(seed).choice(rows, calibration_size, replace=False))
        return rows

    def private_nn_scores(self, calibration_size: int | None = None, seed: int = 0,
                          calibration: Chunks | None = None) -> np.ndarray:
        """Each (sampled) private image's score to its nearest *other* private image (among the sample)."""
        rows = self.calibration_rows(len(self.real), calibration_size, seed)
        if self.metric == "cosine":
            f = self.real_features[rows]
            return nearest_cosine(f, f, self.chunk, exclude_self=True, device=self.device)[1]
        if calibration is None:  # gather the sampled rows (the images are in memory already)
            picked = [c[rows[(rows >= off) & (rows < off + len(c))] - off] for off, c in self.real]
            calibration = Chunks.of(np.concatenate(picked), self.chunk)  # already [0, 1] floats
        else:
            calibration = Chunks(calibration.parts, calibration.sizes,
                                 lambda part, load=calibration.load: _gate_unit(load(part)))
        scores = []
        for offset, part in calibration:  # queries a chunk at a time, against every calibration chunk
            scores.append(nearest_tiled_l2(part, calibration, self.tile, self.reduce, self.chunk,
                                           device=self.device, query_rows=offset + np.arange(len(part)))[1])
        return np.concatenate(scores)

    def check(self, keys: list[str], images) -> ReplicationResult:
        """Nearest private image and copy verdict for one batch of synthetic images."""
        x = as_unit_images(images, "images")
        if len(keys) != len(x):
            raise ValueError(f"keys: {len(keys)} keys for {len(x)} images")
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"queries: image shape {x.shape[1:]} differs from the reference's {self.image_shape}")
        if self.metric == "tiled_l2":
            if self.index is None:
                idx, score = nearest_tiled_l2(x, self.real, self.tile, self.reduce, self.chunk, device=self.device)
            else:  # the index's candidates, re-ranked with the exact tiled distance
                candidates = self.index.candidates(candidate_vectors(x, self.index.params.grid))
                idx, score = nearest_tiled_l2_among(x, self.stored, candidates, self.tile, self.reduce,
                                                    to_unit=_gate_unit)
            is_copy = score <= self.threshold
        else:
            if self.index is None:
                idx, score = nearest_cosine(self._features(x), self.real_features, self.chunk, device=self.device)
            else:
                idx, score = self.index.nearest_cosine(unit_features(self._features(x)))
            is_copy = score >= self.threshold
        return ReplicationResult(self.metric, self.threshold, list(keys), self.real_index[idx], score, is_copy)


def replication_gate(synthetic: Iterable[tuple[list[str], np.ndarray]], real_images, **gate_kwargs) -> ReplicationResult:
    """Check every synthetic image against the private set; ``synthetic`` yields (keys, images) batches.

    ``gate_kwargs`` as for ``ReplicationGate`` (metric, tile, reduce, feature_fn, quantile, ...).
    Returns one ``ReplicationResult`` over all batches (per-sample arrays are small even for 1M images).
    """
    gate = ReplicationGate(real_images, **gate_kwargs)
    parts = [gate.check(keys, images) for keys, images in synthetic]
    keys = [k for p in parts for k in p.keys]
    cat = lambda name, dtype: (np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, dtype))
    return ReplicationResult(gate.metric, gate.threshold, keys, cat("real_index", np.int64), cat("score", np.float32),
                             cat("is_copy", bool))


def write_audit(result: ReplicationResult, uri: str) -> None:
    """One row per synthetic image (key, real_index, metric, score, is_copy) as CSV or JSONL, by suffix.

    Written atomically through ``synthset.storage`` (local paths or object-store URIs).
    """
    from synthset import storage

    if uri.endswith(".csv"):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["key", "real_index", "metric", "score", "is_copy"])
        writer.writeheader()
        writer.writerows(result.rows())
        data = buf.getvalue()
    elif uri.endswith(".jsonl"):
        data = "".join(json.dumps(r) + "\n" for r in result.rows())
    else:
        raise ValueError(f"uri: audit file must end with .csv or .jsonl (got {uri!r})")
    storage.write_bytes(uri, data.encode())
