"""Generative metrics (eval/generative.py) against closed forms and hand-computed toy cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from synthset.eval.generative import (FeatureStats, diversity, extract_features, fid, frechet_distance, generative_report,
                                      kid, knn_radii, per_class_fid, polynomial_mmd2, prdc, recognizability)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_closed_form_for_commuting_gaussians():
    # Same eigenvectors: FD = ‖Δμ‖² + Σ (√a_i − √b_i)².
    q = random_rotation(4, 0)
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 0.5, 0.1])
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.0, 0.5])
    expected = (mu2 ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_sqrtm_formula_in_general():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    # singular covariance (fewer samples than dims) stays finite and non-negative
    assert frechet_distance(mu1, np.zeros((5, 5)), mu1, np.zeros((5, 5))) == 0.0


def test_fid_is_zero_on_identical_sets_and_grows_with_a_mean_shift():
    x = np.random.default_rng(2).normal(size=(2000, 8))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    shifts = [0.5, 1.0, 2.0]
    values = [fid(x, x + s) for s in shifts]
    # A pure shift leaves the covariance alone: FID = ‖δ·1‖² = 8 δ² exactly.
    np.testing.assert_allclose(values, [8 * s ** 2 for s in shifts], rtol=1e-9)
    y = np.random.default_rng(3).normal(size=(2000, 8))  # a second sample of the same Gaussian: small
    assert fid(x, y) < 0.05


def test_streaming_feature_stats_match_numpy():
    x = np.random.default_rng(4).normal(size=(301, 6)) * 3 + 1
    s = FeatureStats()
    for i in range(0, 301, 50):
        s.update(x[i:i + 50])
    np.testing.assert_allclose(s.mean, x.mean(0))
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), atol=1e-10)
    with pytest.raises(ValueError, match="dims"):
        s.update(np.zeros((2, 5)))


def test_kid_unbiased_estimator_and_behaviour():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(7, 3))
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3
    brute = (sum(k(x[i:i + 1], x[j:j + 1])[0, 0] for i in range(6) for j in range(6) if i != j) / 30
             + sum(k(y[i:i + 1], y[j:j + 1])[0, 0] for i in range(7) for j in range(7) if i != j) / 42
             - 2 * k(x, y).mean())
    assert polynomial_mmd2(x, y) == pytest.approx(brute)
    a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=500)
    assert abs(same_mean) < 0.01 and same_std < 0.03  # unbiased: ~0 (observed |mean| <= 0.004 over seeds)
    small_mean, _ = kid(a, b + 0.2, num_subsets=20, subset_size=500)
    shifted_mean, _ = kid(a, b + 1.0, num_subsets=20, subset_size=500)
    assert 0.08 < small_mean < shifted_mean and shifted_mean > 5
    assert kid(a, b, num_subsets=3, subset_size=50, seed=1) == kid(a, b, num_subsets=3, subset_size=50, seed=1)


def test_prdc_by_hand_on_a_line():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    np.testing.assert_allclose(knn_radii(real, 1), [1, 1, 1, 1])
    m = prdc(real, fake, k=1)
    # 0.5 lies in the balls of 0 and 1, 10 in none; fake radii are 9.5, so every real point is recalled.
    assert m == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5})


def test_prdc_on_toy_clouds():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(800, 2))
    same = prdc(real, rng.normal(size=(800, 2)), k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    assert 0.8 < same["density"] < 1.2
    far = prdc(real, rng.normal(size=(800, 2)) + 20, k=5)
    assert far == pytest.approx({"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0})
    collapsed = prdc(real, rng.normal(size=(800, 2)) * 0.05, k=5)  # mode collapse at the centre
    assert collapsed["precision"] > 0.95 and collapsed["coverage"] < 0.2 and collapsed["recall"] < 0.2


def test_prdc_does_not_depend_on_chunk_size():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(200, 3)), rng.normal(size=(150, 3)) + 0.3
    assert prdc(real, fake, k=3, chunk=17) == prdc(real, fake, k=3, chunk=1024)



def prdc_brute_force(real, fake, k):
    """PRDC from full distance matrices, with the definitions of Naeem et al.'s ``compute_prdc``."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_r = np.sort(dist(real, real), axis=1)[:, k]  # index 0 is the point itself; copies also count, at 0
    fake_r = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    inside = d < real_r[:, None]  # open balls: strict <
    return {"precision": inside.any(0).mean(), "recall": (d < fake_r[None, :]).any(1).mean(),
            "density": inside.sum(0).mean() / k, "coverage": (d.min(1) < real_r).mean()}


def test_prdc_matches_the_reference_semantics_on_ties():
    """The expected semantics are those of Naeem et al.'s reference ``prdc`` 0.2 (``compute_prdc``):
    NND_k is the (k+1)-th smallest distance within the set, the point itself and its copies included
    at 0, and ball membership is a strict ``<``. Checked once against the package itself (installed in
    a scratch directory, not a dependency) on the cases below; its numbers are in the comments.
    """
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, size=(30, 6))
    real = np.repeat(base, rng.integers(1, 7, size=30), axis=0).astype(float)  # rows repeated 1–6 times
    fake = np.concatenate([real[rng.choice(len(real), 40)], rng.integers(0, 4, size=(40, 6))]).astype(float)
    # compute_prdc(real, fake, 5): precision 0.35, recall 1.0, density 0.185, coverage 34/121 = 0.281;
    # closed balls (<=, as this module had it) gave 0.7875, 1.0, 0.9325, 1.0.
    expected = prdc_brute_force(real, fake, 5)
    assert expected == pytest.approx({"precision": 0.35, "recall": 1.0, "density": 0.185, "coverage": 34 / 121})
    np.testing.assert_array_equal(knn_radii(real, 5, chunk=7), np.sort(np.linalg.norm(
        real[:, None] - real[None], axis=-1), axis=1)[:, 5])  # rows with 6 copies: radius 0
    assert prdc(real, fake, k=5, chunk=7) == pytest.approx(expected, abs=1e-12)

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(120, 8)), rng.normal(size=(90, 8)) * 1.3 + 0.4
    # compute_prdc: 0.5889 (53/90), 0.975, 0.4156 (187/450), 0.7
    expected = prdc_brute_force(real, fake, 5)
    assert expected == pytest.approx({"precision": 53 / 90, "recall": 0.975, "density": 187 / 450, "coverage": 0.7})
    assert prdc(real, fake, k=5, chunk=7) == pytest.approx(expected, abs=1e-12)

    # Float copies: ties at 0 and between equal distances, which the ‖x‖² + ‖y‖² − 2xᵀy form (torch.cdist,
    # and the reference's sklearn distance) splits by rounding. Exact: 0.5625, 0.869, 0.49, 0.645; strict <
    # on torch.cdist alone gave 0.5875, 0.869, 0.52, 0.701; compute_prdc 0.65, 0.869, 0.635, 0.757.
    rng = np.random.default_rng(9)
    real = np.repeat(rng.normal(size=(30, 64)) * 3 + 5, rng.integers(1, 7, size=30), axis=0)
    fake = np.concatenate([real[rng.choice(len(real), 40)], rng.normal(size=(40, 64)) * 3 + 5])
    expected = prdc_brute_force(real, fake, 5)
    assert expected == pytest.approx({"precision": 0.5625, "recall": 93 / 107, "density": 0.49, "coverage": 69 / 107})
    for chunk in (7, 1024):
        assert prdc(real, fake, k=5, chunk=chunk) == pytest.approx(expected, abs=1e-12)

def test_recognizability_per_class_f1():
    intended = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    r = recognizability(predicted, intended, 3)
    # class 0: TP 2, FP 1, FN 1 → 4/6; class 1: TP 2, FP 1, FN 0 → 4/5; class 2: TP 0, FN 1 → 0
    np.testing.assert_allclose(r["per_class_f1"], [4 / 6, 4 / 5, 0.0])
    assert r["mean_f1"] == pytest.approx((4 / 6 + 4 / 5) / 3)
    probs = np.eye(3)[predicted]
    assert recognizability(probs, intended, 3) == r
    assert np.isnan(recognizability(np.array([0]), np.array([0]), 2)["per_class_f1"][1])
    with pytest.raises(ValueError, match="classes"):
        recognizability(np.array([3]), np.array([0]), 3)


def test_diversity_is_per_class_feature_std():
    rng = np.random.default_rng(8)
    f = np.concatenate([rng.normal(0, 1.0, size=(4000, 5)), rng.normal(0, 3.0, size=(4000, 5))])
    labels = np.r_[np.zeros(4000, int), np.ones(4000, int)]
    d = diversity(f, labels, 3)
    assert d["per_class"][0] == pytest.approx(1.0, rel=0.03) and d["per_class"][1] == pytest.approx(3.0, rel=0.03)
    assert np.isnan(d["per_class"][2]) and d["mean"] == pytest.approx(2.0, rel=0.03)
    tiny = np.array([[0.0, 0.0], [2.0, 4.0]])
    assert diversity(tiny, np.array([0, 0]), 1)["per_class"][0] == pytest.approx((np.sqrt(2) + np.sqrt(8)) / 2)


def test_report_in_a_classifier_feature_space():
    from synthset.data.sources import load_digits_fixture
    from synthset.data.splits import to_unit_tensor
    from synthset.models.classifiers import SmallCNN

    train, test = load_digits_fixture()
    torch.manual_seed(0)
    model = SmallCNN(10, 1, width=8).eval()
    real = extract_features(model.embed, to_unit_tensor(train.images[:400]), batch_size=128)
    fake = extract_features(model.embed, to_unit_tensor(test.images[:300]), batch_size=128)
    noise = extract_features(model.embed, torch.rand(300, 1, 8, 8) * 2 - 1)
    assert real.shape == (400, 32)
    good = generative_report(real, fake, fake_labels=test.labels[:300], fake_predicted=test.labels[:300],
                             num_classes=10, kid_subsets=10, kid_subset_size=200)
    bad = generative_report(real, noise, kid_subsets=10, kid_subset_size=200)
    assert good["fid"] < bad["fid"] and good["kid_mean"] < bad["kid_mean"]
    assert good["precision"] > bad["precision"] and good["recognizability"] == 1.0
    real_labels, fake_labels = train.labels[:400], test.labels[:300]
    pcf = per_class_fid(real, real_labels, fake, fake_labels, 10)
    assert set(pcf) == set(range(10)) and all(v >= 0 for v in pcf.values())
    # Each class's value is the FID of that class's reals against that class's fakes (the same float64
    # arithmetic on the same rows, hence rel=1e-9); another pairing differs by a factor 2–6 here.
    for c in range(10):
        assert pcf[c] == pytest.approx(fid(real[real_labels == c], fake[fake_labels == c]), rel=1e-9), c
    # Independently of fid's own code: class c's fakes are its reals moved by δ_c = 0.05·c in all F = 32
    # dims, in shuffled order. A pure shift keeps the covariance, so FID_c = F·δ_c² exactly (class 0: 0);
    # the covariance terms cancel up to the rounding of eigenvalue square roots, ≲ √ε·tr Σ_c ≈ 1e-8·tr Σ_c.
    shift = 0.05 * np.arange(10)
    order = np.random.default_rng(0).permutation(len(real))
    moved = (real.astype(np.float64) + shift[real_labels][:, None])[order]
    shifted = per_class_fid(real, real_labels, moved, real_labels[order], 10)
    assert set(shifted) == set(range(10))
    for c in range(10):
        trace = np.trace(np.cov(real[real_labels == c].astype(np.float64), rowvar=False))
        assert shifted[c] == pytest.approx(32 * shift[c] ** 2, rel=1e-9, abs=1e-6 * trace), c


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="fake_features"):
        fid(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="real_features"):
        fid(np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="k"):
        prdc(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
