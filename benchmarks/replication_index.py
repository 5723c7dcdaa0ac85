"""The replication gate's faiss index against the exact search: recall@1 and queries per second.

    .venv/bin/python benchmarks/replication_index.py [--private 20000] [--synthetic 2000] [--size 64]
        [--cosine-private 20000] [--dim 512] [--threads 2] [--skip-tiled] [--skip-cosine]

tiled_l2 (what the gate does by default): procedural RGB images (``data/procedural.py``: a shape per class
on a noisy background) at ``--size`` px, tiles of 8, ``--private`` private and ``--synthetic`` synthetic
images of which ``--copies`` are planted copies of private images (±6 grey levels of noise), the rest fresh
procedural images. The threshold is calibrated exactly on 2,000 private images, as the stage does. Exact:
``ReplicationGate.check`` without an index; faiss: the same gate with ``index="faiss"``, candidates ranked by
the largest block-mean difference (``distance="max"``, the default) or by the RMS of the block means
(``"rms"``), at the defaults and a few other ``nprobe`` / candidate counts (one index per distance; the
search settings change per row).

cosine: the gate's index over ``--dim``-d features (synthetic, not a real encoder's: 100 clusters in a
32-d latent space mapped to ``--dim`` dims through a random ReLU layer, plus noise), ``--cosine-private``
private and ``--synthetic`` synthetic rows, ``--copies`` of them near-copies (noise 0.02 per dim);
exact: ``nearest_cosine``.

Per configuration: recall@1 (the index's nearest private image is the exact search's), separately for the
planted copies and the fresh images; how many verdicts (copy or not) differ; the planted copies flagged;
build and query time. One JSON line per configuration.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from synthset.eval.replication import Chunks, ReplicationGate, calibrate_threshold, nearest_cosine  # noqa: E402
from synthset.eval.replication_index import (IndexParams, PrivateIndex, default_nlist,  # noqa: E402
                                             import_faiss, unit_features)

BATCH = 256  # synthetic images per check, as the stage's QUERY_BATCH


def procedural(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) procedural images, written as JPEGs and read back (as a source would)."""
    from pathlib import Path

    from PIL import Image

    from synthset.data.procedural import write_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(tmp, n, size, 10, seed)
        files = sorted(Path(tmp).rglob("*.jpg"), key=lambda p: p.name)
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def compare(name: str, exact_idx, exact_score, idx, score, threshold: float, higher_is_closer: bool, copies: int,
            planted: np.ndarray, extra: dict) -> dict:
    same = idx == exact_idx
    flag = (lambda s: s >= threshold) if higher_is_closer else (lambda s: s <= threshold)
    out = {"config": name, **extra, "recall_at_1": round(float(same.mean()), 4),
           "recall_at_1_copies": round(float(same[:copies].mean()), 4),
           "recall_at_1_fresh": round(float(same[copies:].mean()), 4),
           "exact_copies": int(flag(exact_score).sum()), "index_copies": int(flag(score).sum()),
           "verdicts_differ": int((flag(score) != flag(exact_score)).sum()),
           "planted_flagged": f"{int((flag(score[:copies]) & (idx[:copies] == planted)).sum())}/{copies}"}
    if not same.all():  # how far off the misses are: score ratio (distance / exact, or exact − similarity)
        miss = ~same
        gap = (exact_score[miss] - score[miss]) if higher_is_closer else (score[miss] / exact_score[miss])
        out["miss_gap_median"] = round(float(np.median(gap)), 4)
    print(json.dumps(out), flush=True)
    return out


def tiled(args) -> None:
    t0 = time.perf_counter()
    private = procedural(args.private, args.size, 0)
    synthetic = procedural(args.synthetic, args.size, 1)
    rng = np.random.default_rng(0)
    planted = rng.choice(args.private, args.copies, replace=False)
    noisy = private[planted].astype(np.int16) + rng.integers(-6, 7, private[planted].shape)
    synthetic[:args.copies] = np.clip(noisy, 0, 255).astype(np.uint8)
    keys = [f"s{i}" for i in range(len(synthetic))]
    batches = [(keys[b:b + BATCH], synthetic[b:b + BATCH]) for b in range(0, len(keys), BATCH)]
    print(json.dumps({"tiled_l2": f"{args.private} private x {args.synthetic} synthetic, {args.size}px RGB, tile 8",
                      "images_seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    t0 = time.perf_counter()
    exact_gate = ReplicationGate(private, tile=8, calibration_size=2000, seed=0)
    calibration = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = [exact_gate.check(k_, x) for k_, x in batches]
    exact_s = time.perf_counter() - t0
    exact_idx, exact_score = np.concatenate([p.real_index for p in parts]), np.concatenate([p.score for p in parts])
    print(json.dumps({"config": "exact", "calibration_seconds": round(calibration, 1),
                      "threshold": round(exact_gate.threshold, 4), "query_seconds": round(exact_s, 1),
                      "queries_per_s": round(len(keys) / exact_s, 1)}), flush=True)

    for distance, settings in (("max", ((32, 32), (8, 32), (64, 32), (32, 64))), ("rms", ((32, 32), (32, 128)))):
        t0 = time.perf_counter()
        gate = ReplicationGate(private, tile=8, threshold=exact_gate.threshold, index="faiss",
                               index_params=IndexParams(min_private=2, distance=distance))
        build = time.perf_counter() - t0
        built = gate.index
        info = {"build_seconds": round(build, 1), "nlist": int(built.ivf.nlist), "grid": built.params.grid,
                "index_mb": round(built.to_array().nbytes / 2 ** 20, 1)}
        for nprobe, k in settings:
            gate.index = PrivateIndex(built.index, "tiled_l2", IndexParams(nprobe=nprobe, k=k, distance=distance))
            t0 = time.perf_counter()
            parts = [gate.check(k_, x) for k_, x in batches]
            seconds = time.perf_counter() - t0
            idx, score = np.concatenate([p.real_index for p in parts]), np.concatenate([p.score for p in parts])
            compare(f"faiss distance={distance} nprobe={nprobe} candidates={k}", exact_idx, exact_score, idx, score,
                    exact_gate.threshold, False, args.copies, planted,
                    {**info, "query_seconds": round(seconds, 1), "queries_per_s": round(len(keys) / seconds, 1),
                     "speedup": round(exact_s / seconds, 1)})


def features(n: int, seed: int, centers: np.ndarray, weights: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, centers.shape[1])) * 0.6
    return (np.maximum(z @ weights, 0) + rng.normal(size=(n, weights.shape[1])) * 0.05).astype(np.float32)


def cosine(args) -> None:
    rng = np.random.default_rng(0)
    centers, weights = rng.normal(size=(100, 32)), rng.normal(size=(32, args.dim)) / np.sqrt(32)
    private = features(args.cosine_private, 1, centers, weights)
    synthetic = features(args.synthetic, 2, centers, weights)
    planted = rng.choice(len(private), args.copies, replace=False)
    synthetic[:args.copies] = private[planted] + rng.normal(size=(args.copies, args.dim)).astype(np.float32) * 0.02
    print(json.dumps({"cosine": f"{args.cosine_private} private x {args.synthetic} synthetic, {args.dim}-d "
                                f"synthetic features"}), flush=True)
    cal = ReplicationGate.calibration_rows(len(private), 2000, 0)
    threshold = calibrate_threshold(nearest_cosine(private[cal], private[cal], exclude_self=True)[1], "cosine")
    t0 = time.perf_counter()
    exact_idx, exact_sim = nearest_cosine(synthetic, private)
    exact_s = time.perf_counter() - t0
    print(json.dumps({"config": "exact", "threshold": round(threshold, 4), "query_seconds": round(exact_s, 2),
                      "queries_per_s": round(len(synthetic) / exact_s, 1)}), flush=True)
    t0 = time.perf_counter()
    built = PrivateIndex.build(Chunks.of(unit_features(private), 4096), "cosine", IndexParams())
    info = {"build_seconds": round(time.perf_counter() - t0, 1), "nlist": default_nlist(len(private)),
            "index_mb": round(built.to_array().nbytes / 2 ** 20, 1)}
    for nprobe in (32, 8, 4):
        index = PrivateIndex(built.index, "cosine", IndexParams(nprobe=nprobe))
        t0 = time.perf_counter()
        idx, sim = index.nearest_cosine(unit_features(synthetic))
        seconds = time.perf_counter() - t0
        compare(f"faiss nprobe={nprobe}", exact_idx, exact_sim, idx, sim, threshold, True, args.copies, planted,
                {**info, "query_seconds": round(seconds, 3), "queries_per_s": round(len(synthetic) / seconds, 1),
                 "speedup": round(exact_s / seconds, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--private", type=int, default=20000)
    parser.add_argument("--synthetic", type=int, default=2000)
    parser.add_argument("--copies", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cosine-private", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-tiled", action="store_true")
    parser.add_argument("--skip-cosine", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.skip_cosine:
        cosine(args)
    if not args.skip_tiled:
        tiled(args)
    print(json.dumps({"total_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
