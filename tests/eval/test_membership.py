"""The membership experiment around LiRA (eval/membership.py): candidates, training halves, seeds, queries,
accuracies and scoring, as plain functions (no Ray, no storage)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthset.config import PrivacyConfig
from synthset.eval.lira import keep_matrix
from synthset.eval.membership import (candidate_record, draw_candidates, membership_accuracy, query_logits,
                                      query_views, score_shadows, score_target, shadow_seed, shadow_train_index,
                                      variants)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- candidates and training halves ----------------------------------------------------------------

def test_candidates_with_a_holdout_are_half_members_half_holdout():
    privacy = PrivacyConfig(num_candidates=20, seed=4)
    cand = draw_candidates(100, privacy, num_holdout=30)
    assert len(cand) == 20 and len(np.unique(cand)) == 20 and np.all(np.diff(cand) > 0)
    assert (cand >= 100).sum() == 10 and cand.max() < 130  # 10 holdout (pool 100..129), 10 private
    assert np.array_equal(cand, draw_candidates(100, privacy, 30))                       # seeded
    assert not np.array_equal(cand, draw_candidates(100, privacy.model_copy(update={"seed": 5}), 30))
    all_holdout = draw_candidates(100, PrivacyConfig(num_candidates=None), 30)
    assert len(all_holdout) == 60 and set(range(100, 130)) <= set(all_holdout)  # None: 2 × holdout
    for n in (21, 62):  # odd, or more than the holdout can give half of
        with pytest.raises(ValueError, match="privacy.num_candidates"):
            draw_candidates(100, PrivacyConfig(num_candidates=n), 30)


def test_candidates_without_a_holdout_come_from_the_private_split():
    assert np.array_equal(draw_candidates(12, PrivacyConfig(num_candidates=None)), np.arange(12))
    cand = draw_candidates(50, PrivacyConfig(num_candidates=8, seed=1))
    assert len(cand) == 8 and cand.max() < 50


def test_candidate_record_marks_teacher_members_by_pool_index():
    labels = np.arange(10) % 3
    record = candidate_record(np.array([1, 6, 8]), labels, num_private=7, class_names=["a", "b", "c"])
    assert record == {"num_private": 7, "num_holdout": 3, "private_index": [1, 6, 8], "labels": [1, 0, 2],
                      "is_member": [True, True, False], "class_names": ["a", "b", "c"]}


def test_shadow_trains_on_the_rest_and_its_in_candidates_including_holdout_ones():
    cand = np.array([2, 5, 11, 13])  # 11 and 13 are holdout images (num_private = 10)
    keep_row = np.array([True, False, True, False])
    train = shadow_train_index(10, cand, keep_row)
    assert train.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 11]  # never 5 or 13 (OUT), never other holdout images


def test_shadow_seeds_depend_on_seed_and_index_only():
    seeds = [shadow_seed(0, s) for s in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2 ** 31 for s in seeds)
    assert seeds == [shadow_seed(0, s) for s in range(8)] and shadow_seed(1, 0) != seeds[0]


# ---- queries -----------------------------------------------------------------------------------------

def test_query_logits_are_the_model_on_every_view_in_any_batch_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 3))
    x = torch.rand(7, 1, 5, 5) * 2 - 1
    got = query_logits(model, x, shift=1, flip=True, batch_size=3)
    assert got.shape == (7, 10, 3) and got.dtype == np.float32
    views = query_views(x, 1, True)
    with torch.no_grad():
        expected = model(views.flatten(0, 1)).reshape(7, 10, 3).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(query_logits(model, x, 1, True, batch_size=512), got, rtol=1e-5, atol=1e-6)


def test_membership_accuracy_on_the_identity_view():
    logits = np.zeros((4, 2, 3), dtype=np.float32)
    logits[:, 0] = [[5, 0, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]]
    logits[:, 1, 1] = 9.0  # the shifted views do not count
    labels = np.array([0, 1, 1, 1])
    assert membership_accuracy(logits, labels, np.array([True, True, False, False])) == (1.0, 0.0)
    acc_in, acc_out = membership_accuracy(logits, labels, np.ones(4, dtype=bool))
    assert acc_in == 0.5 and np.isnan(acc_out)
    with pytest.raises(ValueError, match="logits"):
        membership_accuracy(logits[:, 0], labels, np.ones(4, dtype=bool))


# ---- scoring -------------------------------------------------------------------------------------------

def test_variants_by_shadows_per_side():
    assert set(variants(1)) == {"online_fixed_var", "offline_fixed_var"}
    assert variants(2) == {"online": (True, False), "online_fixed_var": (True, True),
                           "offline_fixed_var": (False, True), "offline": (False, False)}
    with pytest.raises(ValueError, match="num_shadows"):
        variants(0)


def _leaky_shadows(num_shadows=8, n=40, gap=3.0, seed=0):
    """Shadow logits whose true-class margin is ``gap`` higher on the candidates they trained on."""
    rng = np.random.default_rng(seed)
    keep = keep_matrix(num_shadows, n, seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 0.3, size=(num_shadows, n, 2, 3))
    logits[np.arange(num_shadows)[:, None], np.arange(n)[None], :, labels[None]] += gap * keep[..., None]
    return logits, keep, labels


def test_score_shadows_finds_leaky_members_and_not_a_leak_free_recipe():
    logits, keep, labels = _leaky_shadows()
    metrics, curves = score_shadows(logits, labels, keep)
    assert set(metrics) == {"online", "online_fixed_var", "offline", "offline_fixed_var"}
    assert all(m["auc"] > 0.95 for m in metrics.values()), metrics
    assert set(curves) == set(metrics)
    flat, keep0, labels0 = _leaky_shadows(gap=0.0, seed=1)
    assert abs(score_shadows(flat, labels0, keep0)[0]["online_fixed_var"]["auc"] - 0.5) < 0.1


def test_score_target_orients_members_up():
    logits, keep, labels = _leaky_shadows()
    rng = np.random.default_rng(3)
    member = np.arange(40) % 2 == 0
    target = rng.normal(0, 0.3, size=(40, 2, 3))
    target[np.arange(40), :, labels] += 3.0 * member[:, None]
    metrics, _ = score_target(logits, keep, labels, target, member)
    assert all(m["auc"] > 0.95 and m["members"] == 20 for m in metrics.values()), metrics
    # The same target scored against the opposite membership: the attack must now look maximally wrong.
    swapped, _ = score_target(logits, keep, labels, target, ~member)
    assert all(m["auc"] < 0.05 for m in swapped.values()), swapped
