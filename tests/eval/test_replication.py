"""Replication gate (eval/replication.py): copies are flagged, unrelated images are not, chunking does
not change answers, and the threshold is the private set's own nearest-neighbour quantile."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from synthset.data.sources import load_digits_fixture
from synthset.eval.replication import (ReplicationGate, as_unit_images, calibrate_threshold, nearest_cosine,
                                       nearest_tiled_l2, replication_gate, to_tiles, write_audit)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_fixture()
    return train.images[:300], test.images  # private (uint8 8×8), held-out


def brute_tiled(q: np.ndarray, r: np.ndarray, tile: int, reduce: str) -> np.ndarray:
    """(M, N) tiled RMS distances, the slow obvious way."""
    out = np.zeros((len(q), len(r)))
    for i in range(len(q)):
        for j in range(len(r)):
            per = []
            for y in range(0, q.shape[2], tile):
                for x in range(0, q.shape[3], tile):
                    a, b = q[i, :, y:y + tile, x:x + tile], r[j, :, y:y + tile, x:x + tile]
                    per.append(np.sqrt(((a - b) ** 2).mean()))
            out[i, j] = max(per) if reduce == "max" else np.mean(per)
    return out


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_tiled_l2_matches_brute_force_and_ignores_chunking(reduce):
    rng = np.random.default_rng(0)
    q, r = rng.random((9, 1, 8, 8)).astype(np.float32), rng.random((13, 1, 8, 8)).astype(np.float32)
    d = brute_tiled(q, r, 4, reduce)
    # Pixels in [0, 1], so distances are ≤ 1 and atol 1e-5 is relative to that scale: float32's
    # |q|² + |r|² − 2q·r rounds them by ≲ 3e-7 here, and the nearest two differ by ≥ 5e-5 (so idx is exact).
    for chunk in (4, 1024):
        idx, dist = nearest_tiled_l2(q, r, tile=4, reduce=reduce, chunk=chunk)
        np.testing.assert_array_equal(idx, d.argmin(1))
        np.testing.assert_allclose(dist, d.min(1), atol=1e-5)
    # exclude_self: the nearest *other* image
    d_self = brute_tiled(r, r, 4, reduce)
    np.fill_diagonal(d_self, np.inf)
    idx, dist = nearest_tiled_l2(r, r, tile=4, reduce=reduce, chunk=5, exclude_self=True)
    np.testing.assert_array_equal(idx, d_self.argmin(1))
    np.testing.assert_allclose(dist, d_self.min(1), atol=1e-5)


def test_max_over_tiles_ignores_shared_background_mean_does_not():
    # Two images identical except one tile that differs completely: mean is small, max is 1.
    a = np.zeros((1, 1, 8, 8), np.float32)
    b = a.copy()
    b[0, 0, :4, :4] = 1.0
    assert nearest_tiled_l2(a, b, 4, "max")[1][0] == pytest.approx(1.0)
    assert nearest_tiled_l2(a, b, 4, "mean")[1][0] == pytest.approx(0.25)


def test_cosine_matches_brute_force_and_ignores_chunking():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(11, 6)), rng.normal(size=(17, 6))
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    for chunk in (3, 4096):
        idx, s = nearest_cosine(q, r, chunk=chunk)
        np.testing.assert_array_equal(idx, sims.argmax(1))
        np.testing.assert_allclose(s, sims.max(1), atol=1e-5)


def test_tiles_and_image_conversion():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    t = to_tiles(x, 2)
    assert t.shape == (2, 4, 4)
    np.testing.assert_array_equal(t[0, 1], [2, 3, 6, 7])  # top-right tile
    with pytest.raises(ValueError, match="tile"):
        to_tiles(x, 3)
    u = as_unit_images(np.array([[[0, 255]]], np.uint8))
    assert u.shape == (1, 1, 1, 2) and u.max() == 1.0
    np.testing.assert_allclose(as_unit_images(np.array([[[[-1.0, 1.0]]]])), [[[[0.0, 1.0]]]])


def test_calibration_is_the_private_nn_quantile(digits):
    private, _ = digits
    gate = ReplicationGate(private, metric="tiled_l2", tile=4, quantile=0.05)
    x = as_unit_images(private)
    d = brute_tiled(x[:60], x, 4, "max")  # spot-check 60 rows of the NN distances against brute force
    d[np.arange(60), np.arange(60)] = np.inf
    np.testing.assert_allclose(gate.nn_scores[:60], d.min(1), atol=1e-5)  # distances ≤ 1, rounding ≲ 3e-7
    assert gate.threshold == pytest.approx(np.quantile(gate.nn_scores, 0.05))
    assert np.mean(gate.nn_scores <= gate.threshold) == pytest.approx(0.05, abs=0.01)
    assert calibrate_threshold(np.array([0.9, 0.5, 0.1]), "cosine", 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(np.array([1.0, 2.0]), "tiled_l2", 0.0)


def synthetic_batch(private, held_out):
    rng = np.random.default_rng(0)
    noisy = np.clip(private[10].astype(np.int16) + rng.integers(-6, 7, private[10].shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (5, 8, 8)).astype(np.uint8)
    images = np.concatenate([private[5:6], noisy[None], held_out[:40], noise])
    keys = ["copy", "noisy-copy"] + [f"held-out-{i}" for i in range(40)] + [f"noise-{i}" for i in range(5)]
    return keys, images


@pytest.mark.parametrize("metric", ["tiled_l2", "cosine"])
def test_gate_flags_copies_not_unrelated_images(digits, metric, tmp_path):
    private, held_out = digits
    keys, images = synthetic_batch(private, held_out)
    kwargs = {"metric": metric, "tile": 4, "quantile": 0.01, "real_index": np.arange(1000, 1300), "chunk": 64}
    if metric == "cosine":  # pixel space as "features": any callable images → (N, F)
        kwargs["feature_fn"] = lambda x: x.flatten(1)
    result = replication_gate([(keys[:20], images[:20]), (keys[20:], images[20:])], private, **kwargs)
    assert result.keys == keys
    assert result.is_copy[0] and result.real_index[0] == 1005
    assert result.is_copy[1] and result.real_index[1] == 1010
    assert result.is_copy[2:42].sum() <= 2  # held-out digits: about `quantile` of them by construction
    assert not result.is_copy[42:].any()  # pure noise is nothing like a digit
    assert result.summary()["copies"] == result.copies
    write_audit(result, str(tmp_path / "audit.csv"))
    rows = list(csv.DictReader(open(tmp_path / "audit.csv")))
    assert len(rows) == len(keys) and rows[0]["key"] == "copy" and rows[0]["real_index"] == "1005"
    write_audit(result, str(tmp_path / "audit.jsonl"))
    first = json.loads(open(tmp_path / "audit.jsonl").readline())
    assert first["is_copy"] is True and first["metric"] == metric
    with pytest.raises(ValueError, match="uri"):
        write_audit(result, str(tmp_path / "audit.txt"))


def test_gate_in_a_classifier_feature_space(digits):
    from synthset.models.classifiers import SmallCNN

    private, held_out = digits
    torch.manual_seed(0)
    model = SmallCNN(10, 1, width=8).eval()
    gate = ReplicationGate(private, metric="cosine", feature_fn=model.embed, quantile=0.01)
    result = gate.check(["copy", "other"], np.stack([private[7], held_out[0]]))
    assert result.is_copy[0] and result.real_index[0] == 7
    assert result.score[0] == pytest.approx(1.0, abs=1e-5)  # a unit vector·itself over 32 float32 terms: ~1e-7


def test_gate_rejects_bad_input(digits):
    private, _ = digits
    with pytest.raises(ValueError, match="feature_fn"):
        ReplicationGate(private, metric="cosine")
    with pytest.raises(ValueError, match="metric"):
        ReplicationGate(private, metric="ssim")
    gate = ReplicationGate(private[:20], tile=4, threshold=0.1)
    with pytest.raises(ValueError, match="keys"):
        gate.check(["a"], private[:2])
    with pytest.raises(ValueError, match="image shape"):
        gate.check(["a"], np.zeros((1, 16, 16), np.uint8))
