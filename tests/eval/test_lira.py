"""LiRA (eval/lira.py): scoring against hand-computed values, keep-matrix balance, ROC conventions,
and a check that the attack measures membership on real (tiny) models of the digits fixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synthset.eval.lira import (keep_matrix, lira_leave_one_out, lira_offline, lira_online, lira_statistic,
                                plot_roc_loglog, roc_curve, roc_metrics, tpr_at_fpr)


pytestmark = pytest.mark.usefixtures("one_thread")


def norm_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# ---- the statistic -------------------------------------------------------------------------------

def test_statistic_from_probs_and_logits_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    got = lira_statistic(np.array([0, 2]), probs=probs)
    np.testing.assert_allclose(got, [math.log(0.7 / 0.3), math.log(0.3 / 0.7)])
    logits = np.array([[2.0, 1.0, 0.0]])
    got = lira_statistic(np.array([1]), logits=logits)
    np.testing.assert_allclose(got, [1.0 - math.log(math.e ** 2 + 1.0)])


def test_statistic_is_stable_for_confident_models():
    # p_y = 1 - 2e-50/(...): 1 - p_y rounds to 0, the sum of the other probabilities does not.
    logits = np.array([[50.0, 0.0, 0.0]])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = 50.0 - math.log(2.0)
    np.testing.assert_allclose(lira_statistic(np.array([0]), logits=logits), [expected])
    np.testing.assert_allclose(lira_statistic(np.array([0]), probs=probs), [expected], rtol=1e-9)
    # Exactly 0 or 1 is clipped, not inf/nan.
    got = lira_statistic(np.array([0, 1]), probs=np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isfinite(got).all() and got[0] > 100 and got[1] < -100


def test_statistic_keeps_leading_and_query_axes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 2, 4))  # shadows, candidates, queries, classes
    labels = rng.integers(0, 4, 5)
    got = lira_statistic(labels, logits=logits)
    assert got.shape == (3, 5, 2)
    s, i, a = 2, 3, 1
    z = logits[s, i, a]
    other = np.delete(z, labels[i])
    assert got[s, i, a] == pytest.approx(z[labels[i]] - math.log(np.exp(other).sum()))


def test_statistic_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        lira_statistic(np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        lira_statistic(np.array([0, 3]), probs=np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="probs"):
        lira_statistic(np.array([0]), probs=np.full((2, 3), 1 / 3))


# ---- keep matrix -----------------------------------------------------------------------------------

def test_keep_matrix_is_balanced_and_deterministic():
    keep = keep_matrix(8, 101, seed=3)
    assert keep.shape == (8, 101) and keep.dtype == bool
    assert (keep.sum(axis=0) == 4).all()                 # every candidate IN for exactly half
    assert abs(keep.sum(axis=1).mean() - 101 / 2) < 1e-9  # hence each shadow holds N/2 on average
    assert np.array_equal(keep, keep_matrix(8, 101, seed=3))
    assert not np.array_equal(keep, keep_matrix(8, 101, seed=4))


@pytest.mark.parametrize("shadows, candidates, field", [(7, 10, "num_shadows"), (0, 10, "num_shadows"),
                                                         (4, 0, "num_candidates")])
def test_keep_matrix_rejects_bad_sizes(shadows, candidates, field):
    with pytest.raises(ValueError, match=field):
        keep_matrix(shadows, candidates, seed=0)


# ---- online / offline scores against hand computation ------------------------------------------------

# Candidate 0: IN shadows 0, 1 give φ = 2, 4 (μ_in 3, σ_in 1); OUT shadows 2, 3 give 0, −2 (μ_out −1, σ_out 1).
# Candidate 1: IN shadows 0, 2 give 1, 3 (μ_in 2, σ_in 1); OUT shadows 1, 3 give −3, 3 (μ_out 0, σ_out 3).
KEEP = np.array([[True, True], [True, False], [False, True], [False, False]])
SHADOW = np.array([[2.0, 1.0], [4.0, -3.0], [0.0, 3.0], [-2.0, 3.0]])


def test_online_matches_hand_computation():
    target = np.array([3.0, 2.0])
    got = lira_online(target, SHADOW, KEEP)
    # log N(3; 3, 1) − log N(3; −1, 1) = 0 + 16/2 = 8
    # log N(2; 2, 1) − log N(2; 0, 9) = log 3 + 4/18
    np.testing.assert_allclose(got, [8.0, math.log(3) + 4 / 18])
    assert lira_online(np.array([-1.0, 2.0]), SHADOW, KEEP)[0] == pytest.approx(-8.0)


def test_online_fixed_variance_uses_pooled_within_candidate_std():
    # Residuals: candidate 0 (−1, 1, 1, −1), candidate 1 in (−1, 1), out (−3, 3): Σ r² = 24 over 8 → σ² = 3.
    got = lira_online(np.array([3.0, 2.0]), SHADOW, KEEP, fixed_variance=True)
    np.testing.assert_allclose(got, [16 / 6, 4 / 6])


def test_offline_matches_hand_computation():
    got = lira_offline(np.array([3.0, 2.0]), SHADOW, KEEP)
    np.testing.assert_allclose(got, [math.log(norm_cdf(4.0)), math.log(norm_cdf(2 / 3))])
    # OUT residuals (1, −1, −3, 3): σ² = 20 / 4 = 5.
    got = lira_offline(np.array([3.0, 2.0]), SHADOW, KEEP, fixed_variance=True)
    np.testing.assert_allclose(got, [math.log(norm_cdf(4 / math.sqrt(5))), math.log(norm_cdf(2 / math.sqrt(5)))])


def test_scores_average_over_queries():
    shadow = np.stack([SHADOW, SHADOW + 1.0], axis=-1)  # query 2 is query 1 shifted by +1
    target = np.array([[3.0, 4.0], [2.0, 3.0]])
    np.testing.assert_allclose(lira_online(target, shadow, KEEP), lira_online(target[:, 0], SHADOW, KEEP))
    target2 = np.array([[3.0, 0.0], [2.0, 3.0]])  # second query of candidate 0 at μ_out + 1 = 0
    expected0 = (8.0 + (-(0 - 4) ** 2 / 2 + (0 - 0) ** 2 / 2)) / 2
    assert lira_online(target2, shadow, KEEP)[0] == pytest.approx(expected0)


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="keep"):
        lira_online(np.zeros(2), SHADOW, KEEP[:, :1])
    with pytest.raises(ValueError, match="shadow_stats"):
        lira_online(np.zeros(3), SHADOW, KEEP)
    with pytest.raises(ValueError, match="per-example variance"):  # one IN shadow cannot give a variance
        lira_online(np.zeros(2), SHADOW[:3], KEEP[:3])
    lira_online(np.zeros(2), SHADOW[:3], KEEP[:3], fixed_variance=True)  # but a global one can


def test_leave_one_out_uses_the_other_models():
    rng = np.random.default_rng(1)
    keep = keep_matrix(6, 7, seed=0)
    stats_all = rng.normal(size=(6, 7, 2)) + 2.0 * keep[:, :, None]
    got = lira_leave_one_out(stats_all, keep, online=False)
    assert got.shape == (6, 7)
    # Target 4: besides model 4, each candidate loses the first model after 4 (5, 0, 1, ...) on the other side.
    use = np.ones_like(keep)
    use[4] = False
    for i in range(7):
        other = next(s for s in (5, 0, 1, 2, 3) if keep[s, i] != keep[4, i])
        use[other, i] = False
    assert (use & keep).sum(axis=0).tolist() == [2] * 7 and (use & ~keep).sum(axis=0).tolist() == [2] * 7
    np.testing.assert_allclose(got[4], lira_offline(stats_all[4], stats_all, keep, use=use))
    with pytest.raises(ValueError, match="balanced"):
        lira_leave_one_out(stats_all, np.roll(keep, 1, axis=1) & keep)


def test_leave_one_out_is_at_chance_without_signal():
    # Pure noise: group sizes must not leak the target's membership (unbalanced leave-one-out did: AUC << 0.5).
    rng = np.random.default_rng(2)
    keep = keep_matrix(6, 2000, seed=1)
    stats_all = rng.normal(size=(6, 2000, 1))
    for online in (True, False):
        scores = lira_leave_one_out(stats_all, keep, online=online)
        assert abs(roc_metrics(scores.ravel(), keep.ravel())["auc"] - 0.5) < 0.03


# ---- ROC metrics ---------------------------------------------------------------------------------------

def test_roc_metrics_toy():
    m = roc_metrics(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    assert m["auc"] == pytest.approx(0.75)  # 3 of the 4 (member, non-member) pairs ordered correctly
    assert m["tpr_at_0.001_fpr"] == pytest.approx(0.5)  # the top score is a member, then a false positive
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert roc_metrics(np.array([1.0, 1.0]), np.array([True, False]))["auc"] == pytest.approx(0.5)  # ties: half
    perfect = roc_metrics(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0]))
    assert perfect["auc"] == 1.0 and perfect["tpr_at_0.001_fpr"] == 1.0


def test_tpr_at_fpr_step_convention():
    # 1000 non-members score 0..999; 10 members above all of them, 1 between 998 and 999, 10 at the bottom.
    non = np.arange(1000.0)
    members = np.r_[np.arange(1000.0, 1010.0), 998.5, np.full(10, -5.0)]
    scores = np.r_[non, members]
    is_member = np.r_[np.zeros(1000, bool), np.ones(21, bool)]
    m = roc_metrics(scores, is_member)
    assert m["tpr_at_0.001_fpr"] == pytest.approx(11 / 21)  # FPR 1/1000 <= 0.1% admits the 998.5 member
    assert m["tpr_at_0.01_fpr"] == pytest.approx(11 / 21)
    assert m["fpr_resolution"] == pytest.approx(1e-3)
    fpr, tpr = roc_curve(scores, is_member)
    assert tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(10 / 21)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0


def test_roc_rejects_one_sided_labels():
    with pytest.raises(ValueError, match="is_member"):
        roc_metrics(np.array([1.0, 2.0]), np.array([True, True]))


def test_plot_roc_loglog(tmp_path):
    fpr, tpr = roc_curve(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0]))
    path = tmp_path / "roc.png"
    plot_roc_loglog({"online": (fpr, tpr)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="curves"):
        plot_roc_loglog({}, path)


# ---- does LiRA measure membership? ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_models():
    """8 shadow MLPs on balanced halves of 400 digits candidates, plus two targets (seconds, 1 thread)."""
    import torch

    from synthset.data.sources import load_digits_fixture
    from synthset.data.splits import to_unit_tensor
    from synthset.models.training import array_batches, fit_classifier

    data, _ = load_digits_fixture()
    x, y = to_unit_tensor(data.images).flatten(1), torch.from_numpy(data.labels)
    perm = np.random.default_rng(0).permutation(len(y))
    cand, unrelated = perm[:400], perm[400:600]

    def train(index, seed):  # deliberately overfit: 60 epochs, no augmentation, ~200 images
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        xs, ys = x[index], y[index]
        fit_classifier(model, lambda e: array_batches(xs, ys, 32, seed, e), 60, (len(xs) + 31) // 32, 3e-3, 0.0,
                       soft=False, temperature=1.0, augment=False, seed=seed)
        with torch.no_grad():
            return model(x[cand]).numpy()[:, None]  # (N, 1 query, C)

    keep = keep_matrix(8, 400, seed=0)
    shadows = np.stack([train(cand[keep[s]], s) for s in range(8)])
    target_in = np.random.default_rng(5).random(400) < 0.5
    labels = data.labels[cand]
    return {"keep": keep, "labels": labels, "shadow_stats": lira_statistic(labels, logits=shadows),
            "target_in": target_in,
            "member_target": lira_statistic(labels, logits=train(cand[target_in], 99)),
            "blind_target": lira_statistic(labels, logits=train(unrelated, 98))}


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed", [True, False])
def test_lira_detects_members_of_an_overfit_target(digits_models, online, fixed):
    d = digits_models
    score = (lira_online if online else lira_offline)(d["member_target"], d["shadow_stats"], d["keep"],
                                                       fixed_variance=fixed)
    assert roc_metrics(score, d["target_in"])["auc"] > 0.62


@pytest.mark.parametrize("online", [True, False])
def test_lira_is_at_chance_for_a_target_that_never_saw_the_candidates(digits_models, online):
    d = digits_models
    score = (lira_online if online else lira_offline)(d["blind_target"], d["shadow_stats"], d["keep"])
    assert abs(roc_metrics(score, d["target_in"])["auc"] - 0.5) < 0.1


def test_lira_leave_one_out_on_shadows(digits_models):
    d = digits_models
    scores = lira_leave_one_out(d["shadow_stats"], d["keep"], online=True, fixed_variance=True)
    assert roc_metrics(scores.ravel(), d["keep"].ravel())["auc"] > 0.62
