"""Shadow trainers on in-memory tensors (eval/shadow_training.py): recipes, determinism, and which
inputs each kind of shadow depends on. Tiny CNNs on 8×8 two-class images train in well under a second."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthset.config import ClassifierConfig, StudentConfig
from synthset.eval.shadow_training import (classifier_shadow_logits, pipeline_shadow_logits, shadow_recipe,
                                           student_seed)

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = ClassifierConfig(width=4, epochs=3, batch_size=16, lr=0.01, augment=False)


def _images(n: int, seed: int):
    """Two classes: a bright top half (0) or a bright bottom half (1), plus noise; (N, 1, 8, 8) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -0.8) + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i in range(n):
        x[i, :, :4] += 1.2 if y[i] == 0 else 0.0
        x[i, :, 4:] += 1.2 if y[i] == 1 else 0.0
    return x.clamp(-1, 1), y


def test_shadow_recipe_takes_the_target_architecture_and_the_teacher_training():
    teacher = ClassifierConfig(width=16, epochs=30, lr=0.004)
    student = StudentConfig(arch="resnet", width=8, epochs=2, lr=0.1)
    recipe = shadow_recipe(teacher, student)
    assert (recipe.arch, recipe.width, recipe.pretrained) == ("resnet", 8, None)
    assert (recipe.epochs, recipe.lr) == (30, 0.004) and type(recipe) is ClassifierConfig
    assert shadow_recipe(teacher) == teacher == shadow_recipe(teacher, teacher)


def test_classifier_shadow_learns_its_half_and_is_seeded():
    x, y = _images(48, 0)
    xq, yq = _images(10, 1)
    logits = classifier_shadow_logits(RECIPE, 2, x, y, xq, seed=3, query_shift=1, query_flip=False)
    assert logits.shape == (10, 5, 2) and logits.dtype == np.float32
    assert (logits[:, 0].argmax(-1) == yq.numpy()).mean() >= 0.9  # it trained on (x, y)
    np.testing.assert_allclose(classifier_shadow_logits(RECIPE, 2, x, y, xq, 3, 1, False), logits, atol=1e-5)
    assert not np.allclose(classifier_shadow_logits(RECIPE, 2, x, y, xq, 4, 1, False), logits, atol=1e-3)


def test_pipeline_shadow_soft_labels_come_from_the_half_and_hard_labels_do_not():
    x_half, y_half = _images(48, 0)
    x_synth, y_synth = _images(32, 2)
    x_query, _ = _images(6, 3)
    student = StudentConfig(width=4, epochs=2, batch_size=16, lr=0.01, augment=False, temperature=2.0)
    run = lambda xh, yh, labels: pipeline_shadow_logits(RECIPE, student, 2.0, 2, xh, yh, x_synth, y_synth, x_query,
                                                        labels, seed=5, query_shift=0, query_flip=True)
    soft = run(x_half, y_half, "soft")
    assert soft.shape == (6, 2, 2) and np.isfinite(soft).all()
    np.testing.assert_allclose(run(x_half, y_half, "soft"), soft, atol=1e-5)
    # A shadow Teacher trained on the other labelling of its half changes the soft labels, hence the Student.
    assert not np.allclose(run(x_half, 1 - y_half, "soft"), soft, atol=1e-3)
    hard = run(x_half, y_half, "hard")
    np.testing.assert_allclose(run(x_half, 1 - y_half, "hard"), hard, atol=1e-6)  # no Teacher reads the half
    with pytest.raises(ValueError, match="labels"):
        run(x_half, y_half, "fuzzy")
    assert student_seed(5) != 5 and student_seed(5) == student_seed(5)
