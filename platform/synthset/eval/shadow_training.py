"""LiRA's shadow models as plain functions of in-memory tensors, seeds and recipes (no Ray, no storage).

A shadow imitates a target's training on a random half of the candidates (Carlini et al. 2022,
Algorithm 1: IN models train on a random subset of the data with the candidate, OUT models without
it) and is queried like the target (``eval/membership.py: query_logits``). Two kinds:

* ``classifier_shadow_logits``: one classifier recipe on real images — the Teacher's recipe, with
  the target's architecture (``shadow_recipe``); TCKR's notebook attacks a Student this way.
* ``pipeline_shadow_logits``: the pipeline downstream of generation repeated on the half — a shadow
  Teacher labels the Student's synthetic training images, a shadow Student learns them (soft labels);
  with hard labels no Teacher is involved and only the Student's training is repeated.

Training images are uint8 arrays (N, H, W[, C]), converted a batch at a time, or float tensors
(N, C, H, W) in [-1, 1]; queries are float tensors; labels int64 tensors; every function returns
float32 logits (len(x_query), A, C). ``stages/privacy.py`` loads the arrays and runs these as Ray
tasks; tests: ``tests/eval/test_shadow_training.py``.
"""

from __future__ import annotations

import math

import numpy as np

from synthset.config import ClassifierConfig
from synthset.eval.membership import query_logits

# The fields of a classifier recipe that are the target's architecture (the rest is the training recipe).
ARCH_FIELDS = ("arch", "width", "pretrained")


def shadow_recipe(teacher: ClassifierConfig, target: ClassifierConfig | None = None) -> ClassifierConfig:
    """The ``classifier`` shadows' recipe: the Teacher's (epochs, lr, augmentation), with the target's
    architecture fields (``ARCH_FIELDS``); the Teacher's own recipe when ``target`` is None."""
    if target is None:
        return teacher
    return teacher.model_copy(update={k: getattr(target, k) for k in ARCH_FIELDS})


def _layout(x):
    """(per-batch transform, channels) of training images: uint8 (N, H, W[, C]) arrays become the models' float
    a batch at a time (``to_unit_tensor``: the same values, a quarter of the memory); float tensors are used as
    they are."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        from synthset.data.splits import to_unit_tensor

        return to_unit_tensor, 1 if x.ndim == 3 else x.shape[-1]
    return None, x.shape[1]


def fit_recipe(recipe: ClassifierConfig, num_classes: int, x, y, seed: int, name: str, soft=None,
               temperature: float = 1.0, device: str = "cpu"):
    """Build ``recipe``'s architecture with ``seed`` and train it on (x, y) with the recipe's epochs, lr,
    weight decay and augmentation; ``soft`` (N, C) probabilities switch to distillation at ``temperature``.
    ``name`` labels the progress lines. Returns the trained model (eval mode)."""
    from synthset.models.classifiers import build_classifier
    from synthset.models.training import array_batches, fit_classifier

    recipe = recipe.model_copy(update={"seed": seed})
    transform, channels = _layout(x)
    model = build_classifier(recipe, num_classes, in_channels=channels).to(device)
    steps = math.ceil(len(x) / recipe.batch_size)
    fit_classifier(model, lambda epoch: array_batches(x, y, recipe.batch_size, seed, epoch, soft, transform),
                   recipe.epochs,
                   steps, recipe.lr, recipe.weight_decay, soft=soft is not None, temperature=temperature,
                   augment=recipe.augment, seed=seed, name=name)
    return model


def classifier_shadow_logits(recipe: ClassifierConfig, num_classes: int, x_train, y_train, x_query, seed: int,
                             query_shift: int, query_flip: bool, name: str = "shadow",
                             device: str = "cpu") -> np.ndarray:
    """Train ``recipe`` on (x_train, y_train) with hard labels; its logits on the augmented views of x_query.

    ``seed`` seeds the initialisation and the batch order (``shadow_seed`` per shadow);
    ``query_shift``/``query_flip`` as in ``query_views``.
    """
    model = fit_recipe(recipe, num_classes, x_train, y_train, seed, name, device=device)
    return query_logits(model, x_query, query_shift, query_flip)


def student_seed(seed: int) -> int:
    """The shadow Student's seed, derived from the shadow's seed (its Teacher uses ``seed`` itself)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0] % (2 ** 31))


def pipeline_shadow_logits(teacher: ClassifierConfig, student: ClassifierConfig, temperature: float,
                           num_classes: int, x_train, y_train, x_synthetic, y_synthetic, x_query, labels: str,
                           seed: int, query_shift: int, query_flip: bool, label_batch_size: int = 512,
                           name: str = "shadow", device: str = "cpu") -> np.ndarray:
    """A ``pipeline`` shadow: the pipeline downstream of generation on one half; logits on the queries.

    ``labels="soft"``: the ``teacher`` recipe on (x_train, y_train) with ``seed`` → its probabilities
    on every synthetic image (batches of ``label_batch_size``) → the ``student`` recipe distilled on
    them at ``temperature``. ``labels="hard"``: the classes ``y_synthetic`` the images were generated
    for, which no Teacher reads, so only the Student's training is repeated. The Student's seed is
    ``student_seed(seed)``.
    """
    import torch

    from synthset.models.training import predict_proba

    soft = None
    if labels == "soft":
        shadow_teacher = fit_recipe(teacher, num_classes, x_train, y_train, seed, f"{name}-teacher", device=device)
        transform, _ = _layout(x_synthetic)
        if transform is None:
            soft = torch.from_numpy(predict_proba(shadow_teacher, x_synthetic, label_batch_size))
        else:  # the same batches, converted one at a time
            soft = torch.from_numpy(np.concatenate([
                predict_proba(shadow_teacher, transform(x_synthetic[i:i + label_batch_size]), label_batch_size)
                for i in range(0, len(x_synthetic), label_batch_size)]))
    elif labels != "hard":
        raise ValueError(f"labels: must be 'soft' or 'hard' (got {labels!r})")
    shadow_student = fit_recipe(student, num_classes, x_synthetic, y_synthetic, student_seed(seed),
                                f"{name}-student-{labels}", soft, temperature, device)
    return query_logits(shadow_student, x_query, query_shift, query_flip)
