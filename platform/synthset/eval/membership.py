"""The membership-inference experiment around LiRA: candidates, training halves, queries, scores.

Plain functions (numpy, torch for the queries; no Ray) that ``stages/privacy.py`` runs as Ray tasks.
The attack itself (statistic, Gaussians, ROC) is ``eval/lira.py``; this module sets up what it
attacks, following the protocol of Carlini et al. 2022 ("Membership Inference Attacks From First
Principles", arXiv:2112.03570):

* ``candidate_pool`` / ``draw_candidates``: which private images are asked about. With a holdout
  (``data.splits.holdout > 0``) half the candidates are holdout images — non-members of every
  target — and half private training images — members of the Teacher (and, through its labels, of
  the Students). Candidates are indices into the *pool* = private training split followed by the
  holdout.
* ``shadow_train_index`` / ``shadow_seed``: shadow s trains on (private training split minus the
  candidates) ∪ {candidates IN for s} (``keep_matrix`` row s), with a seed derived from
  (``privacy.seed``, s) only.
* ``query_views`` / ``query_logits``: every model is queried on each candidate under the training
  augmentations (identity, ±shift pixels in x and y, optional horizontal flips) — the paper's
  augmented-query variant.
* ``score_shadows`` (leave-one-out over the shadows: the paper's evaluation) and ``score_target``
  (an external target with known membership), each for every ``variants`` of LiRA.

Run: ``jobs/privacy.py`` / ``jobs/evaluate.py`` (through ``stages/privacy.py``); tests:
``tests/eval/test_membership.py``.
"""

from __future__ import annotations

import numpy as np

from synthset.config import PrivacyConfig
from synthset.eval.lira import (lira_leave_one_out, lira_offline, lira_online, lira_statistic, roc_curve,
                                roc_metrics)


def draw_candidates(num_private: int, privacy: PrivacyConfig, num_holdout: int = 0) -> np.ndarray:
    """Sorted pool indices of the candidates (``privacy.num_candidates``, drawn with ``privacy.seed``).

    Without a holdout: ``num_candidates`` private indices (all of them when None). With one: half
    from the holdout (pool indices >= ``num_private``, the non-members) and half from the private
    training split, each drawn without replacement; None means 2 × ``num_holdout``.
    """
    n = privacy.num_candidates
    rng = np.random.default_rng([privacy.seed, 1])
    if num_holdout == 0:
        if n is None:
            return np.arange(num_private)
        if n > num_private:
            raise ValueError(f"privacy.num_candidates: {n} exceeds the {num_private} images of the private split")
        return np.sort(rng.choice(num_private, n, replace=False))
    n = 2 * num_holdout if n is None else n
    if n % 2 or n // 2 > num_holdout or n // 2 > num_private:
        raise ValueError(f"privacy.num_candidates: {n} must be even, with half ({n // 2}) at most the holdout "
                         f"({num_holdout}) and the private training split ({num_private})")
    out = num_private + rng.choice(num_holdout, n // 2, replace=False)
    inn = rng.choice(num_private, n // 2, replace=False)
    return np.sort(np.concatenate([inn, out]))


def candidate_record(candidates: np.ndarray, labels: np.ndarray, num_private: int, class_names: list[str]) -> dict:
    """What a shadow set records about its candidates (``candidates.json``).

    ``candidates``: pool indices (``draw_candidates``); ``labels``: the pool's labels. ``is_member``
    is membership of the Teacher: a pool index below ``num_private`` is a private training image.
    """
    candidates = np.asarray(candidates)
    return {"num_private": int(num_private), "num_holdout": int(len(labels) - num_private),
            "private_index": candidates.tolist(), "labels": np.asarray(labels)[candidates].tolist(),
            "is_member": (candidates < num_private).tolist(), "class_names": list(class_names)}


def shadow_train_index(num_private: int, candidates: np.ndarray, keep_row: np.ndarray) -> np.ndarray:
    """Private indices a shadow trains on: D_rest (non-candidates) plus its IN candidates (``keep_row``)."""
    rest = np.setdiff1d(np.arange(num_private), candidates)
    return np.sort(np.concatenate([rest, candidates[keep_row]]))


def shadow_seed(seed: int, shadow_id: int) -> int:
    """Each shadow's training seed derives from (privacy.seed, shadow index) only."""
    return int(np.random.SeedSequence([seed, shadow_id]).generate_state(1)[0] % (2 ** 31))


def query_views(x, shift: int, flip: bool):
    """Augmented queries of images (N, C, H, W) in [-1, 1] → (N, A, C, H, W).

    Views: identity, then shifts by (+s, 0), (−s, 0), (0, +s), (0, −s) pixels (padding −1 = black,
    as ``random_shift`` in training) when ``shift`` > 0; with ``flip``, the horizontal flip of every
    view follows (A doubles). LiRA queries each candidate under the training augmentations (its multi-query variant).
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"shift: must be >= 0 (got {shift})")
    views = [x]
    if shift:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        for dy, dx in ((0, shift), (0, -shift), (shift, 0), (-shift, 0)):
            views.append(padded[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w])
    if flip:
        views += [v.flip(-1) for v in views]
    return torch.stack(views, dim=1)


def query_logits(model, x, shift: int, flip: bool, batch_size: int = 512) -> np.ndarray:
    """float32 logits (N, A, C) of ``model`` on ``query_views(x, shift, flip)``."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            v = query_views(x[i:i + batch_size], shift, flip)
            n, a = v.shape[:2]
            out.append(model(v.flatten(0, 1).to(device)).float().cpu().reshape(n, a, -1))
    return torch.cat(out).numpy()


def membership_accuracy(logits: np.ndarray, labels: np.ndarray, is_member: np.ndarray) -> tuple[float, float]:
    """(accuracy on members, accuracy on non-members) of logits (N, A, C) on their identity query.

    The gap between the two is the overfitting that LiRA turns into membership signal; NaN for a
    side without candidates.
    """
    logits, labels, is_member = np.asarray(logits), np.asarray(labels), np.asarray(is_member, dtype=bool)
    if logits.ndim != 3 or logits.shape[0] != len(labels) or is_member.shape != labels.shape:
        raise ValueError(f"logits: expected (N, A, C) with N = {len(labels)} labels and membership flags, "
                         f"got {logits.shape} and {is_member.shape}")
    correct = logits[:, 0].argmax(-1) == labels
    side = lambda m: float(correct[m].mean()) if m.any() else float("nan")
    return side(is_member), side(~is_member)


def variants(per_side: int) -> dict[str, tuple[bool, bool]]:
    """LiRA variants computable with ``per_side`` IN and OUT shadows per candidate: name → (online, fixed_variance).

    Per-example variance needs >= 2 shadows on each side, a global variance >= 1. Leave-one-out
    over S models leaves S/2 − 1 per side (``lira_leave_one_out``); an external target has S/2.
    """
    if per_side < 1:
        raise ValueError(f"num_shadows: too few shadow models ({per_side} per side)")
    out = {"online_fixed_var": (True, True), "offline_fixed_var": (False, True)}
    if per_side >= 2:
        out = {"online": (True, False), **out, "offline": (False, False)}
    return out


def score_shadows(logits: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> tuple[dict, dict]:
    """Leave-one-out LiRA over all models: (metrics per variant, ROC curve per variant).

    ``logits`` (S, N, A, C), ``labels`` (N,), ``keep`` bool (S, N). Each model is the target once;
    the S × N scores with ground truth ``keep`` give one ROC per variant.
    """
    stats_all = lira_statistic(labels, logits=logits)  # (S, N, A)
    metrics, curves = {}, {}
    for name, (online, fixed) in variants(len(logits) // 2 - 1).items():
        scores = lira_leave_one_out(stats_all, keep, online=online, fixed_variance=fixed)
        metrics[name] = roc_metrics(scores.ravel(), keep.ravel())
        curves[name] = roc_curve(scores.ravel(), keep.ravel())
    return metrics, curves


def score_target(shadow_logits: np.ndarray, keep: np.ndarray, labels: np.ndarray, target_logits: np.ndarray,
                 is_member: np.ndarray) -> tuple[dict, dict]:
    """LiRA on one external target with known membership, all S shadows as reference.

    ``shadow_logits`` (S, N, A, C) and ``keep`` (S, N) as stored by the stage; ``target_logits``
    (N, A, C) from ``query_logits`` on the same candidates; ``is_member`` (N,) bool. Needs members
    and non-members among the candidates.
    """
    s_stats = lira_statistic(labels, logits=shadow_logits)
    t_stats = lira_statistic(labels, logits=target_logits)
    keep = np.asarray(keep, dtype=bool)
    per_side = int(min(keep.sum(axis=0).min(), (~keep).sum(axis=0).min()))
    metrics, curves = {}, {}
    for name, (online, fixed) in variants(per_side).items():
        score = (lira_online if online else lira_offline)(t_stats, s_stats, keep, fixed_variance=fixed)
        metrics[name] = roc_metrics(score, is_member)
        curves[name] = roc_curve(score, is_member)
    return metrics, curves
