"""The LiRA stage (stages/privacy.py): one shadow without Ray, the shadow-set hash, and the Ray run on
digits with per-shadow resume (with the query views and scoring of eval/membership.py it drives)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from synthset.config import PrivacyConfig, load_config
from synthset.eval.membership import draw_candidates, query_views, score_shadows, score_target, shadow_train_index
from synthset.stages.privacy import prepare_shadow_set, privacy_dir, run_shadow


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """run_shadow sets torch's thread count (right in a Ray worker); give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


DIGITS = ["data.source=digits", "data.image_size=8", "foundation.arch.image_size=8", "data.splits.public=0",
          "data.splits.private=260", "teacher.width=8", "teacher.epochs=25", "teacher.batch_size=32",
          "teacher.augment=false", "teacher.lr=0.005", "ray.num_cpus=2", "tracking.enabled=false"]


@pytest.fixture
def digits_config(tmp_path):
    """Digits (8×8) as the private split, a tiny overfitting Teacher recipe: shadows train in ~1 s."""
    return load_config(None, [f"output.root={tmp_path / 'runs'}", *DIGITS])


def test_privacy_config_validates():
    with pytest.raises(ValueError, match="even"):
        PrivacyConfig(num_shadows=5)
    with pytest.raises(ValueError):
        PrivacyConfig(num_shadows=2)
    with pytest.raises(ValueError):
        PrivacyConfig(unknown=1)


def test_query_views_shift_and_flip():
    x = torch.full((2, 1, 5, 5), -1.0)
    x[:, 0, 2, 1] = 1.0  # one bright pixel at row 2, column 1
    v = query_views(x, shift=1, flip=True)
    assert v.shape == (2, 10, 1, 5, 5)
    assert torch.equal(v[:, 0], x)
    bright = [tuple(torch.nonzero(v[0, a, 0] > 0)[0].tolist()) for a in range(5)]
    assert bright == [(2, 1), (2, 2), (2, 0), (3, 1), (1, 1)]  # identity, x+1, x−1, y+1, y−1
    assert tuple(torch.nonzero(v[0, 5, 0] > 0)[0].tolist()) == (2, 3)  # flipped identity
    assert query_views(x, shift=0, flip=False).shape == (2, 1, 1, 5, 5)


def test_candidates_and_training_halves():
    privacy = PrivacyConfig(num_shadows=4, num_candidates=10, seed=3)
    cand = draw_candidates(50, privacy)
    assert len(np.unique(cand)) == 10 and np.array_equal(cand, draw_candidates(50, privacy))
    keep_row = np.arange(10) % 2 == 0
    train = shadow_train_index(50, cand, keep_row)
    assert len(train) == 40 + 5 and set(cand[keep_row]) <= set(train) and not set(cand[~keep_row]) & set(train)
    with pytest.raises(ValueError, match="privacy.num_candidates"):
        draw_candidates(5, privacy)


def test_run_shadow_without_ray_writes_and_reuses(digits_config):
    privacy = PrivacyConfig(num_shadows=4, num_candidates=60, query_shift=1)
    stage = privacy_dir(digits_config, privacy)
    prepare_shadow_set(stage, digits_config, privacy)
    info = run_shadow(stage.uri, digits_config.to_dict(), privacy.model_dump(), 1)
    logits = np.load(stage.path("shadows", "shadow-001.npy"))
    assert logits.shape == (60, 5, 10) and logits.dtype == np.float32
    assert info["train_images"] == 260 - 60 + 30 and info["accuracy_in"] >= info["accuracy_out"]
    # The shadow overfits its half: that is LiRA's signal. Accuracy cannot show it strictly on digits (OUT
    # candidates score 1.0 as often as IN ones, 12 of 40 shadows measured), the loss can: over privacy
    # seeds 0–9 × shadows 0–3, the mean true-class cross-entropy of OUT candidates was 1.7–14.6 times
    # that of IN ones (this shadow: 4.5). 1.25 leaves room for another machine's training trajectory;
    # a shadow that trained on its OUT candidates too, or on the other half, has a ratio near or below 1.
    cand = json.loads(open(stage.path("candidates.json")).read())
    keep = np.load(stage.path("keep.npy"))[1]
    true_class = torch.log_softmax(torch.from_numpy(logits[:, 0]).double(), -1)[np.arange(60), cand["labels"]]
    loss_in, loss_out = -float(true_class[keep].mean()), -float(true_class[~keep].mean())
    assert keep.sum() == 30
    assert loss_out > 1.25 * loss_in, f"OUT/IN loss ratio {loss_out / loss_in:.2f} ({loss_out:.4f} / {loss_in:.4f})"
    assert run_shadow(stage.uri, digits_config.to_dict(), privacy.model_dump(), 1)["reused"]
    # A different config must not silently reuse the recorded candidates.
    with pytest.raises(ValueError, match="differ"):
        prepare_shadow_set(stage, digits_config, privacy.model_copy(update={"seed": 9}))


def test_score_target_with_known_membership():
    rng = np.random.default_rng(0)
    keep = np.array([[True, False, True, False], [False, True, False, True],
                     [True, False, False, True], [False, True, True, False]])
    labels = np.zeros(4, dtype=np.int64)
    shadow = np.zeros((4, 4, 1, 2))
    shadow[..., 0, 0] = 2.0 * keep + rng.normal(0, 0.1, size=(4, 4))
    target = np.zeros((4, 1, 2))
    member = np.array([True, True, False, False])
    target[:, 0, 0] = 2.0 * member
    metrics, curves = score_target(shadow, keep, labels, target, member)
    assert set(metrics) == {"online", "online_fixed_var", "offline", "offline_fixed_var"}
    assert all(m["auc"] == 1.0 for m in metrics.values())


@pytest.mark.slow
def test_run_privacy_with_ray_on_digits_resumes_per_shadow(digits_config):
    import ray

    from synthset.stages.common import init_ray
    from synthset.stages.privacy import run_privacy

    privacy = PrivacyConfig(num_shadows=6, num_candidates=200, query_shift=1)
    init_ray(digits_config)
    try:
        summary = run_privacy(digits_config, privacy)
        stage = privacy_dir(digits_config, privacy)
        metrics = json.loads(open(stage.path("metrics.json")).read())
        assert set(metrics["variants"]) == {"online", "online_fixed_var", "offline", "offline_fixed_var"}
        assert metrics["queries_per_candidate"] == 5
        # An overfit recipe leaks membership; chance would be 0.5.
        assert metrics["variants"]["online_fixed_var"]["auc"] > 0.55, metrics
        assert summary["shadows_trained_now"] == 6 and os.path.getsize(stage.path("roc_loglog.png")) > 1000
        assert run_privacy(digits_config, privacy)["reused"]
        # Lose one shadow and the success marker: only that shadow is trained again, same numbers.
        before = np.load(stage.path("shadows", "shadow-003.npy"))
        for name in ("_SUCCESS.json", "shadows/shadow-003.json", "shadows/shadow-003.npy"):
            os.remove(stage.path(*name.split("/")))
        again = run_privacy(digits_config, privacy)
        assert again["shadows_trained_now"] == 1
        np.testing.assert_allclose(np.load(stage.path("shadows", "shadow-003.npy")), before, atol=1e-4)
        assert again["lira_online_auc"] == pytest.approx(summary["lira_online_auc"], abs=1e-3)
    finally:
        ray.shutdown()


def test_score_shadows_reports_fixed_variance_only_with_four_models():
    rng = np.random.default_rng(0)
    keep = np.array([[True, False, True, False], [False, True, False, True],
                     [True, False, False, True], [False, True, True, False]])
    logits = rng.normal(size=(4, 4, 2, 3))
    metrics, _ = score_shadows(logits, np.zeros(4, dtype=np.int64), keep)
    assert set(metrics) == {"online_fixed_var", "offline_fixed_var"}


def test_shadow_sets_are_named_by_the_teacher_stage_policy_and_the_shadow_inputs(digits_config):
    from synthset.config import stage_hash
    from synthset.stages.privacy import classifier_shadow_set, shadow_dir

    privacy = PrivacyConfig(num_shadows=4, num_candidates=60)
    base = shadow_dir(digits_config, privacy)
    assert base.uri.endswith(f"/privacy/classifier/{base.hash}")
    # Which sets run, where, and what is done with the results: the same shadows, the same set.
    for update in ({"enabled": True}, {"shadow_modes": ["classifier", "pipeline"]}, {"pipeline_labels": ["soft"]},
                   {"cpus_per_shadow": 4}, {"gpus_per_shadow": 0.5}, {"max_auc": 0.6},
                   {"max_tpr_at_0_1pct_fpr": 0.01}, {"export_to": "/elsewhere"}):
        assert shadow_dir(digits_config, privacy.model_copy(update=update)).hash == base.hash, update
    # What a shadow computes: a new set.
    for update in ({"num_shadows": 6}, {"num_candidates": 40}, {"seed": 1}, {"query_shift": 0}, {"query_flip": True}):
        assert shadow_dir(digits_config, privacy.model_copy(update=update)).hash != base.hash, update
    assert shadow_dir(digits_config, privacy, "pipeline-soft").hash != base.hash
    # The data and the Teacher recipe enter exactly as they enter the Teacher stage's hash.
    for override, same in (("teacher.epochs=3", False), ("data.splits.private=200", False),
                           ("teacher.in_memory_bytes=5", True), ("student.epochs=2", True)):
        other = load_config(None, [f"output.root={digits_config.output.root}", *DIGITS, override])
        same_teacher = stage_hash(other, "teacher") == stage_hash(digits_config, "teacher")
        assert (shadow_dir(other, privacy).hash == base.hash) is same is same_teacher, override
    # Teacher and a Student of the same architecture share the classifier shadows; another width does not.
    student = digits_config.student.model_copy(update={"width": 8, "epochs": 2, "lr": 0.1})
    assert classifier_shadow_set(digits_config, privacy, student).stage == base
    wide = student.model_copy(update={"width": 16})
    assert classifier_shadow_set(digits_config, privacy, wide).stage.hash != base.hash

