"""An approximate nearest-neighbour index over the private set for the replication gate (faiss IVF-Flat).

The exact search of ``eval/replication.py`` compares every synthetic image with every private image;
for large private sets ``PrivateIndex`` (``replication.index: faiss``) looks in a few cells instead:

* an **IVF-Flat** index (Jégou et al. 2011, "Product quantization for nearest neighbor search", §III-A,
  without the quantisation): k-means (``nlist`` centroids, trained on a seeded sample of the private
  vectors) cuts the space into cells, each private vector is stored uncompressed in its centroid's cell, and
  a query is compared exactly with the vectors of its ``nprobe`` nearest cells. Its only error is a
  neighbour in a cell that was not probed; for a fixed seed and training sample the index is the same on
  every run. Recall against the exact search: ``tests/eval/test_replication_index.py`` and
  ``benchmarks/replication_index.py`` (docs/benchmarks.md).
* **cosine**: the vectors are the L2-normalised features and the index ranks by inner product, so its
  nearest neighbour and score are the exact search's whenever the neighbour's cell is probed.
* **tiled_l2**: the max over tiles is not a distance between two single vectors, so the index only proposes
  candidates, which the gate re-ranks with the exact tiled distance (``replication.nearest_tiled_l2_among``):
  the ``k`` private images nearest to the query by their images area-averaged to ``grid`` × ``grid`` blocks
  per channel (``candidate_vectors``), ranked by ``distance``:

  - ``"max"`` (default): the largest difference of any block mean (L∞, ``faiss.METRIC_Linf``), the max over
    tiles on the block means. faiss scans it without SIMD, so a query cost 1.4–2.2 times ``"rms"`` on the
    benchmark's 64 px images, where recall@1 was 0.82 against 0.61. When blocks lie within tiles, a
    block's mean difference in one channel is at most √(C · pixels per tile / pixels per block) times its
    tile's RMS distance (Jensen), so a copy at tiled distance d stays within a fixed multiple of d: a
    loose bound.
  - ``"rms"``: the RMS difference of the block means (L2). Averaging (Jensen) and taking the whole image
    instead of the worst tile only lower a distance: a private image at tiled distance d (``reduce="max"``)
    lies within d of the query. On 3,000 procedural 64 px images the 32nd candidate of 9 queries in 10 lay
    *within* the threshold, so this bound could not rule a miss out either, and a range search for every
    vector within the threshold returned a median of 345 candidates per query (it was left out).

  The cells are k-means cells by L2 for both. What the index can miss: a private image in a cell that was
  not probed (for ``"max"`` likelier than for ``"rms"``: the cells are L2 cells, the ranking is not), and
  one that is not among the ``k`` best of the proxy distance although it is the nearest by the tiled one:
  an image that matches evenly on every tile while others match better on the block means. Planted copies
  (±6 grey levels) were all found in the tests and the benchmark; the nearest private image of a fresh
  image was found for 0.81 of them (``"max"``), and of the fresh images whose exact distance fell under the threshold
  (natural near-duplicates, 198 of 1,900) the index missed 21 with ``"max"`` and 42 with ``"rms"``
  (docs/benchmarks.md). With ``reduce="mean"`` neither proxy relates to the re-ranked distance by a bound.

faiss is imported only here and only when an index is built or loaded (``replication.index: faiss``). The
driver builds the index once; ``to_array`` / ``from_array`` carry it to the gate's pool actors through
Ray's object store as a uint8 array (``faiss.serialize_index``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def import_faiss():
    """The faiss module, imported on first use (``replication.index: faiss``)."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a pinned dependency
        raise ImportError("replication.index: faiss needs the faiss-cpu package (pip install faiss-cpu)") from err
    return faiss


@dataclass(frozen=True)
class IndexParams:
    """The index's settings (``replication.index_*``): ``nlist`` cells (None: ``default_nlist``), ``nprobe``
    cells searched per query; for tiled_l2 ``k`` candidates re-ranked per query, the averaging ``grid`` and the
    ``distance`` that ranks candidates ("max" or "rms", see the module docstring); ``min_private``: below this
    many private images the gate searches exactly; ``seed`` of the training sample and of k-means."""

    nlist: int | None = None
    nprobe: int = 32
    k: int = 32
    grid: int = 16
    min_private: int = 10_000
    seed: int = 0
    distance: str = "max"


# faiss's k-means wants at least this many training vectors per centroid (it warns below) and samples at
# most 256 per centroid; the index trains on TRAIN_PER_LIST per cell (or every private vector, if fewer).
MIN_PER_LIST, TRAIN_PER_LIST = 39, 64


def default_nlist(n: int) -> int:
    """4·√n cells (the low end of faiss's guideline of 4·√n to 16·√n), at most n / 39 so that every
    centroid has its 39 training vectors, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_PER_LIST))


def effective_grid(grid: int, height: int, width: int) -> tuple[int, int]:
    """The averaging grid actually used: per side, the largest divisor of the image side that is at most
    ``grid`` (equal blocks, so the averaged distance stays a lower bound of the pixel distance)."""
    side = lambda n: max(d for d in range(1, min(grid, n) + 1) if n % d == 0)
    return side(height), side(width)


def candidate_vectors(unit_images: np.ndarray, grid: int) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] → float32 (N, C·gh·gw): the images averaged over equal blocks to a
    ``effective_grid`` grid, divided by √(C·gh·gw) so that the L2 distance of two vectors is the RMS
    distance of the averaged images (≤ the whole-image RMS distance ≤ the max-over-tiles distance)."""
    x = np.asarray(unit_images, dtype=np.float32)
    n, c, h, w = x.shape
    gh, gw = effective_grid(grid, h, w)
    pooled = x.reshape(n, c, gh, h // gh, gw, w // gw).mean(axis=(3, 5), dtype=np.float32)
    return np.ascontiguousarray(pooled.reshape(n, -1) / np.float32(math.sqrt(c * gh * gw)))


def unit_features(features) -> np.ndarray:
    """(N, F) features → float32 rows of unit length (the exact search's normalisation)."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"features: must be (N, F), got shape {f.shape}")
    return np.ascontiguousarray(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), np.float32(1e-12)))


class PrivateIndex:
    """An IVF-Flat index over the private set's vectors (see the module docstring): row i of the index is row i
    of the private set. ``metric``: "cosine" (inner product of unit features) or "tiled_l2" (L∞ or L2 of
    ``candidate_vectors``, by ``params.distance``)."""

    def __init__(self, index, metric: str, params: IndexParams):
        if metric not in ("tiled_l2", "cosine"):
            raise ValueError(f"metric: must be 'tiled_l2' or 'cosine' (got {metric!r})")
        self.index, self.metric, self.params = index, metric, params
        self.ivf = import_faiss().extract_index_ivf(index)
        self.ivf.nprobe = min(params.nprobe, self.ivf.nlist)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors, metric: str, params: IndexParams) -> "PrivateIndex":
        """Train on a seeded sample of ``vectors`` and add them all. ``vectors``: a ``Chunks`` of float32
        (n, d) arrays (``candidate_vectors`` or ``unit_features`` of the private set), read twice, a chunk
        at a time: once for the training sample, once to add."""
        faiss = import_faiss()
        n = len(vectors)
        nlist = min(params.nlist or default_nlist(n), n)
        train_rows = np.arange(n)
        if n > TRAIN_PER_LIST * nlist:
            train_rows = np.sort(np.random.default_rng(params.seed).choice(n, TRAIN_PER_LIST * nlist, replace=False))
        train = np.ascontiguousarray(vectors.take(train_rows), dtype=np.float32)
        dim = train.shape[1]
        if metric == "cosine":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = True  # centroids of unit vectors, renormalised (faiss's advice for cosine)
        elif params.distance in ("max", "rms"):  # cells by L2 k-means either way; "max" scans them by L∞
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist,
                                       faiss.METRIC_Linf if params.distance == "max" else faiss.METRIC_L2)
        else:
            raise ValueError(f"distance: must be 'max' or 'rms' (got {params.distance!r})")
        index.cp.seed = params.seed
        index.cp.min_points_per_centroid = 1  # small sets (nlist = n // 39 or the config's) train without warnings
        index.train(train)
        for _, part in vectors:
            index.add(np.ascontiguousarray(part, dtype=np.float32))
        return cls(index, metric, params)

    def to_array(self) -> np.ndarray:
        """The index as a uint8 array (``faiss.serialize_index``), for Ray's object store or a ``.npy`` file."""
        return import_faiss().serialize_index(self.index)

    @classmethod
    def from_array(cls, array: np.ndarray, metric: str, params: IndexParams) -> "PrivateIndex":
        return cls(import_faiss().deserialize_index(np.ascontiguousarray(array, dtype=np.uint8)), metric, params)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (M, k), rows (M, k)) of the ``k`` nearest private vectors in the probed cells, best first:
        inner product for cosine; for tiled_l2 the L∞ or squared L2 distance; row −1 where fewer were found. A
        query whose probed cells held nothing at all is searched again in every cell."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        k = min(k, len(self))
        scores, rows = self.index.search(vectors, k)
        empty = np.flatnonzero(rows[:, 0] < 0)
        if len(empty):
            params = import_faiss().SearchParametersIVF(nprobe=self.ivf.nlist)
            scores[empty], rows[empty] = self.index.search(vectors[empty], k, params=params)
        return scores, rows

    def candidates(self, vectors: np.ndarray) -> np.ndarray:
        """tiled_l2: (M, k) private rows to re-rank per query (the ``k`` nearest candidate vectors), −1 padded."""
        return self.search(vectors, self.params.k)[1]

    def nearest_cosine(self, unit_query_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cosine: (row (M,) int64, similarity (M,) float32) of each query's most similar private row found."""
        sims, rows = self.search(unit_query_features, 1)
        return rows[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)

    def describe(self) -> dict:
        """What the stage records: the settings and the index's actual number of cells."""
        return {"kind": "faiss-ivf-flat", **asdict(self.params), "nlist": int(self.ivf.nlist),
                "nprobe": int(self.ivf.nprobe), "vectors": len(self), "dim": int(self.index.d)}
