"""LiRA, the Likelihood Ratio Attack of Carlini et al. 2022, "Membership Inference Attacks From
First Principles" (IEEE S&P 2022, arXiv:2112.03570), as plain numpy/scipy functions.

The attack asks, for each *candidate* example (x, y) and a *target* model f, whether (x, y) was in
f's training set. Shadow models are trained on random halves of the candidates (``keep_matrix``);
each model's confidence on each candidate is turned into the logit-scaled statistic
(``lira_statistic``), and a Gaussian is fitted per candidate to the statistics of the shadows that
trained on it (IN) and of those that did not (OUT):

* online (``lira_online``, Algorithm 1 of the paper): the log likelihood ratio
  log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²);
* offline (``lira_offline``, the paper's offline variant): the one-sided test against the OUT
  Gaussian only, Λ = 1 − Pr[Z > φ] = Φ((φ − μ_out)/σ_out), Z ~ N(μ_out, σ_out²), scored as its log;
* ``fixed_variance``: one global σ instead of per-example σ (the paper's recommendation when few
  shadow models are available: per-example variances need many shadows to be estimated).

Every score is oriented so that *higher means more likely a member*. ``roc_metrics`` reports AUC and
TPR at 0.1% and 1% FPR (the paper's argument: low-FPR TPR, not AUC, measures privacy), and
``plot_roc_loglog`` draws the paper's log-log ROC. With augmented queries (the paper's multi-query
variant: the target is queried on several augmentations of x, e.g. flips and shifts) every statistic carries an
extra query axis A; the Gaussians are fitted per query and the per-query log likelihoods averaged,
as in the authors' reference implementation.

Shapes used below: S shadow models, N candidates, A augmented queries per candidate, C classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats
from scipy.special import logsumexp

# Probabilities are clipped here before taking logs (the reference implementation's 1e-45).
PROB_EPS = 1e-45
# Standard deviations are floored here so a candidate whose shadows all agree cannot divide by zero.
MIN_STD = 1e-8


def keep_matrix(num_shadows: int, num_candidates: int, seed: int) -> np.ndarray:
    """Bool (S, N): ``keep[s, i]`` says candidate i is IN shadow s's training set.

    Balanced: every candidate is IN for exactly half of the shadows (the paper's "random halves",
    arranged so that each candidate has S/2 IN and S/2 OUT shadows), hence ``num_shadows`` must be
    even. Each shadow holds about N/2 candidates. Deterministic in ``seed``.
    """
    if isinstance(num_shadows, bool) or not isinstance(num_shadows, (int, np.integer)) or num_shadows < 2:
        raise ValueError(f"num_shadows: must be an integer >= 2 (got {num_shadows!r})")
    if num_shadows % 2:
        raise ValueError(f"num_shadows: must be even so every candidate is IN for exactly half (got {num_shadows})")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
        raise ValueError(f"num_candidates: must be an integer >= 1 (got {num_candidates!r})")
    rng = np.random.default_rng(seed)
    # Per candidate (column), a random order of the shadows; the first half of that order is IN.
    order = rng.random((num_shadows, num_candidates)).argsort(axis=0).argsort(axis=0)
    return order < num_shadows // 2


def lira_statistic(labels: np.ndarray, probs: np.ndarray | None = None, logits: np.ndarray | None = None) -> np.ndarray:
    """The logit-scaled confidence φ = log p_y − log Σ_{y'≠y} p_{y'} (the paper's φ(p) = log(p / (1 − p))).

    Give exactly one of ``logits`` or ``probs``, shaped (N, C) or (..., N, A, C) (any leading axes,
    e.g. shadows, then candidates, then augmented queries); ``labels`` is int (N,). Returns float64
    (N,) or (..., N, A).

    From logits it is exact: φ = z_y − logsumexp_{y'≠y} z_{y'}. From probabilities, p_y and the sum
    of the *other* probabilities (not 1 − p_y, which rounds to 0 for confident models) are each
    clipped at ``PROB_EPS`` before the logs, so φ is finite even for a probability of exactly 0 or 1.
    """
    if (probs is None) == (logits is None):
        raise ValueError("lira_statistic: give exactly one of probs= or logits=")
    name, x = ("probs", probs) if probs is not None else ("logits", logits)
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: must be a 1-d integer array (got shape {labels.shape}, dtype {labels.dtype})")
    n = len(labels)
    if x.ndim == 2:
        if x.shape[0] != n:
            raise ValueError(f"{name}: shape {x.shape} does not match {n} labels (expected ({n}, C))")
        lab = labels
    elif x.ndim >= 3:
        if x.shape[-3] != n:
            raise ValueError(f"{name}: shape {x.shape} does not match {n} labels (expected (..., {n}, A, C))")
        lab = labels[:, None]  # broadcast over the query axis
    else:
        raise ValueError(f"{name}: expected (N, C) or (..., N, A, C), got shape {x.shape}")
    num_classes = x.shape[-1]
    if num_classes < 2:
        raise ValueError(f"{name}: need at least 2 classes, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: values must lie in [0, {num_classes}) (got {labels.min()}..{labels.max()})")
    onehot = np.arange(num_classes) == np.broadcast_to(lab, x.shape[:-1])[..., None]
    if logits is not None:
        z_true = np.take_along_axis(x, np.broadcast_to(lab, x.shape[:-1])[..., None], axis=-1)[..., 0]
        z_other = logsumexp(np.where(onehot, -np.inf, x), axis=-1)
        return z_true - z_other
    if (x < 0).any() or not np.isfinite(x).all():
        raise ValueError("probs: must be finite and non-negative")
    p_true = np.where(onehot, x, 0.0).sum(axis=-1)
    p_other = np.where(onehot, 0.0, x).sum(axis=-1)
    return np.log(np.maximum(p_true, PROB_EPS)) - np.log(np.maximum(p_other, PROB_EPS))


def _check_shadow_inputs(target_stats, shadow_stats, keep, use=None):
    target_stats = np.asarray(target_stats, dtype=np.float64)
    shadow_stats = np.asarray(shadow_stats, dtype=np.float64)
    keep = np.asarray(keep)
    if target_stats.ndim == 1:
        target_stats = target_stats[:, None]
    if shadow_stats.ndim == 2:
        shadow_stats = shadow_stats[:, :, None]
    if target_stats.ndim != 2:
        raise ValueError(f"target_stats: expected (N,) or (N, A), got shape {target_stats.shape}")
    if shadow_stats.ndim != 3:
        raise ValueError(f"shadow_stats: expected (S, N) or (S, N, A), got shape {shadow_stats.shape}")
    if shadow_stats.shape[1:] != target_stats.shape:
        raise ValueError(f"shadow_stats: shape {shadow_stats.shape} does not match target_stats {target_stats.shape} "
                         "(expected (S, N, A) with the target's (N, A))")
    if keep.dtype != bool or keep.shape != shadow_stats.shape[:2]:
        raise ValueError(f"keep: expected a bool array of shape {shadow_stats.shape[:2]} (S, N), "
                         f"got {keep.dtype} {keep.shape}")
    if not (np.isfinite(target_stats).all() and np.isfinite(shadow_stats).all()):
        raise ValueError("target_stats/shadow_stats: must be finite (compute them with lira_statistic)")
    use = np.ones_like(keep) if use is None else np.asarray(use)
    if use.dtype != bool or use.shape != keep.shape:
        raise ValueError(f"use: expected a bool array of shape {keep.shape} (S, N), got {use.dtype} {use.shape}")
    return target_stats, shadow_stats, keep, use


def _group_moments(shadow_stats: np.ndarray, mask: np.ndarray, group: str, need_std: bool):
    """Per-candidate, per-query mean (N, A) over shadows where ``mask`` (S, N), std and residuals."""
    count = mask.sum(axis=0)  # (N,)
    if (count < 1).any():
        i = int(np.argmin(count))
        raise ValueError(f"keep: candidate {i} has no {group} shadow model; every candidate needs IN and OUT shadows "
                         "(use keep_matrix)")
    if need_std and (count < 2).any():
        i = int(np.argmin(count))
        raise ValueError(f"keep: candidate {i} has only {int(count[i])} {group} shadow model(s); per-example variance "
                         "needs >= 2 — use fixed_variance=True or more shadow models")
    m = mask[:, :, None]
    mean = np.where(m, shadow_stats, 0.0).sum(axis=0) / count[:, None]
    resid = np.where(m, shadow_stats - mean[None], 0.0)
    std = np.sqrt((resid ** 2).sum(axis=0) / count[:, None])  # population std (ddof=0), as the reference code
    return mean, std, resid, m


def _global_std(*groups) -> float:
    """Pooled within-candidate standard deviation: residuals from each candidate's own mean, all groups."""
    sq = sum(float((resid ** 2).sum()) for resid, _ in groups)
    n = sum(int(np.broadcast_to(m, resid.shape).sum()) for resid, m in groups)
    return float(np.sqrt(sq / max(n, 1)))


def lira_online(target_stats: np.ndarray, shadow_stats: np.ndarray, keep: np.ndarray,
                fixed_variance: bool = False, use: np.ndarray | None = None) -> np.ndarray:
    """Online LiRA (Algorithm 1 of Carlini et al. 2022): one score per candidate, higher = member.

    ``target_stats`` (N, A) or (N,): φ of the target model on each candidate (and query);
    ``shadow_stats`` (S, N, A) or (S, N): φ of every shadow; ``keep`` bool (S, N).

    Per candidate i and query a: μ_in, σ_in over shadows with keep[:, i], μ_out, σ_out over the
    others (means, as in Algorithm 1; the reference code uses medians), and the score is the mean
    over queries of
        log N(φ_target; μ_in, σ_in²) − log N(φ_target; μ_out, σ_out²),
    the log of the paper's likelihood ratio Λ = p(φ | N(μ_in, σ_in²)) / p(φ | N(μ_out, σ_out²)).

    ``fixed_variance``: σ_in = σ_out = σ, one global value: the pooled within-candidate standard
    deviation (residuals from each candidate's own IN or OUT mean, over all candidates, queries,
    both groups). The paper uses a global variance when shadows are few; the reference code takes
    the std of all raw IN statistics, which also counts the spread *between* candidates — the
    pooled residual used here estimates the within-candidate noise the Gaussians model. With
    per-example variance every candidate needs >= 2 IN and >= 2 OUT shadows.

    ``use`` (optional bool (S, N)): which shadows count for which candidate (default: all).
    """
    target_stats, shadow_stats, keep, use = _check_shadow_inputs(target_stats, shadow_stats, keep, use)
    mu_in, sd_in, r_in, m_in = _group_moments(shadow_stats, keep & use, "IN", not fixed_variance)
    mu_out, sd_out, r_out, m_out = _group_moments(shadow_stats, ~keep & use, "OUT", not fixed_variance)
    if fixed_variance:
        sd_in = sd_out = np.full_like(mu_in, _global_std((r_in, m_in), (r_out, m_out)))
    log_in = stats.norm.logpdf(target_stats, mu_in, np.maximum(sd_in, MIN_STD))
    log_out = stats.norm.logpdf(target_stats, mu_out, np.maximum(sd_out, MIN_STD))
    return (log_in - log_out).mean(axis=1)


def lira_offline(target_stats: np.ndarray, shadow_stats: np.ndarray, keep: np.ndarray,
                 fixed_variance: bool = False, use: np.ndarray | None = None) -> np.ndarray:
    """Offline LiRA (the paper's offline variant): only OUT shadows; one score per candidate, higher = member.

    Shapes as in ``lira_online``; IN shadows' statistics are ignored (only ``~keep`` is used), so the
    shadows may have been trained before the candidates were chosen. Score = mean over queries of
        log Φ((φ_target − μ_out) / σ_out) = log(1 − Pr[Z > φ_target]),  Z ~ N(μ_out, σ_out²),
    the paper's one-sided hypothesis test (a member's φ lies *above* the OUT distribution). The
    authors' reference code scores −log N(φ; μ_out, σ_out²) instead (two-sided); the one-sided form
    does not reward a target that is unusually *unconfident* on a candidate.

    ``fixed_variance``: σ_out is the pooled within-candidate standard deviation of the OUT group.
    ``use``: as in ``lira_online``.
    """
    target_stats, shadow_stats, keep, use = _check_shadow_inputs(target_stats, shadow_stats, keep, use)
    mu_out, sd_out, r_out, m_out = _group_moments(shadow_stats, ~keep & use, "OUT", not fixed_variance)
    if fixed_variance:
        sd_out = np.full_like(mu_out, _global_std((r_out, m_out)))
    return stats.norm.logcdf(target_stats, mu_out, np.maximum(sd_out, MIN_STD)).mean(axis=1)


def lira_leave_one_out(stats_all: np.ndarray, keep: np.ndarray, online: bool = True,
                       fixed_variance: bool = False, targets: list[int] | None = None) -> np.ndarray:
    """Score each of the S models in turn as the target against the others (the paper's evaluation).

    ``stats_all`` (S, N, A) or (S, N): φ of every model; ``keep`` bool (S, N) from ``keep_matrix``.
    Returns (T, N) scores for the ``targets`` (default: all S); the ground truth is ``keep[targets]``.

    Balanced leave-one-out: removing target t from a balanced keep matrix leaves S/2 − 1 shadows on
    t's side of candidate i and S/2 on the other, so the group sizes alone would reveal t's
    membership (a smaller group has a noisier, on average narrower, fitted Gaussian — with 6 models
    this pushes the per-example AUC far *below* 0.5). For each candidate one more shadow is left
    out from the larger side — the first one after t, cyclically — so every candidate keeps
    exactly S/2 − 1 IN and S/2 − 1 OUT shadows whatever t's membership.
    """
    stats_all = np.asarray(stats_all, dtype=np.float64)
    keep = np.asarray(keep)
    if stats_all.ndim not in (2, 3) or stats_all.shape[0] < 4:
        raise ValueError(f"stats_all: expected (S, N[, A]) with S >= 4 models, got shape {stats_all.shape}")
    if keep.dtype != bool or keep.shape != stats_all.shape[:2]:
        raise ValueError(f"keep: expected a bool array of shape {stats_all.shape[:2]}, got {keep.dtype} {keep.shape}")
    num = stats_all.shape[0]
    if not (keep.sum(axis=0) == num // 2).all() or num % 2:
        raise ValueError("keep: leave-one-out needs a balanced keep matrix (every candidate IN for exactly half; "
                         "use keep_matrix)")
    targets = list(range(num)) if targets is None else list(targets)
    bad = [t for t in targets if not 0 <= t < num]
    if bad:
        raise ValueError(f"targets: indices {bad} outside 0..{num - 1}")
    score = lira_online if online else lira_offline
    out = []
    for t in targets:
        use = np.ones_like(keep)
        use[t] = False
        after = (t + np.arange(1, num)) % num  # the other models, cyclically after t
        first_other_side = after[np.argmax(keep[after] != keep[t][None], axis=0)]  # (N,)
        use[first_other_side, np.arange(keep.shape[1])] = False
        out.append(score(stats_all[t], stats_all, keep, fixed_variance=fixed_variance, use=use))
    return np.stack(out)


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of "member if score >= threshold" over every distinct threshold, from (0, 0) to (1, 1).

    Tied scores enter together (one point per distinct score), so the curve does not depend on the
    order of tied examples.
    """
    scores, is_member = _check_roc_inputs(scores, is_member)
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(m)[last_of_tie]
    fp = np.cumsum(~m)[last_of_tie]
    tpr = np.r_[0.0, tp / m.sum()]
    fpr = np.r_[0.0, fp / (~m).sum()]
    return fpr, tpr


def _check_roc_inputs(scores, is_member):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_member = np.asarray(is_member).ravel()
    if is_member.dtype != bool:
        if not np.isin(is_member, [0, 1]).all():
            raise ValueError("is_member: must be bool or 0/1")
        is_member = is_member.astype(bool)
    if scores.shape != is_member.shape:
        raise ValueError(f"scores: {scores.size} values but is_member has {is_member.size}")
    if not np.isfinite(scores).all():
        raise ValueError("scores: must be finite")
    if is_member.all() or not is_member.any():
        raise ValueError("is_member: needs at least one member and one non-member")
    return scores, is_member


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The highest TPR among ROC points with FPR <= ``max_fpr`` (no interpolation between points).

    This is the TPR of the best threshold whose false-positive rate does not exceed ``max_fpr``
    — achievable, never optimistic. With n non-members FPR moves in steps of 1/n, so for
    ``max_fpr`` < 1/n it is the fraction of members scoring strictly above every non-member.
    (The reference code uses ``fpr < max_fpr``; ``<=`` differs only when a point lies exactly on it.)
    """
    if not 0 <= max_fpr <= 1:
        raise ValueError(f"max_fpr: must lie in [0, 1] (got {max_fpr})")
    return float(np.max(tpr[fpr <= max_fpr]))


def roc_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """AUC, TPR at 0.1% and 1% FPR, and the best balanced accuracy of membership ``scores``.

    ``auc``: area under the ROC with ties counted as half (trapezoids over ``roc_curve``), i.e. the
    probability that a random member outscores a random non-member. ``tpr_at_0.001_fpr`` and
    ``tpr_at_0.01_fpr`` (TPR at 0.1% and 1% FPR; names MLflow accepts): ``tpr_at_fpr`` (step
    convention, no interpolation). ``fpr_resolution``: 1 /
    the number of non-members — a TPR at an FPR below it only counts members above every non-member.
    """
    scores, is_member = _check_roc_inputs(scores, is_member)
    fpr, tpr = roc_curve(scores, is_member)
    return {"auc": float(np.trapezoid(tpr, fpr)),
            "tpr_at_0.001_fpr": tpr_at_fpr(fpr, tpr, 0.001),
            "tpr_at_0.01_fpr": tpr_at_fpr(fpr, tpr, 0.01),
            "balanced_accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
            "members": int(is_member.sum()), "non_members": int((~is_member).sum()),
            "fpr_resolution": 1.0 / int((~is_member).sum())}


def plot_roc_loglog(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                    title: str = "LiRA membership inference") -> None:
    """Draw ROC curves on log-log axes (the paper's Fig. 1 style) with the chance diagonal; save a PNG.

    ``curves``: name → (fpr, tpr), e.g. from ``roc_curve``; the legend shows each curve's AUC.
    FPR/TPR of 0 cannot be drawn on a log axis, so they are clipped at 1e-5 (the axes' lower limit).
    """
    if not curves:
        raise ValueError("curves: need at least one (fpr, tpr) curve")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = 1e-5
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([lo, 1], [lo, 1], ls="--", color="gray", lw=1, label="chance")
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curves[{name!r}]: fpr and tpr must be 1-d arrays of equal length")
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(np.clip(fpr, lo, 1), np.clip(tpr, lo, 1), label=f"{name} (AUC {auc:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
