"""The privacy gate of a release: may a synthetic dataset be published? A plain function of the measured
metrics and the thresholds (no Ray, no storage); ``stages/export.py`` reads the measurements and
publishes, ``jobs/export.py`` runs it.

Three checks, each recorded with its measured value and threshold:

* ``replication``: near-copies of private training images left in the dataset to publish — the
  replication gate's copies minus those it dropped (``eval/replication.py``: nearest private image by
  tiled pixel L2, Carlini et al. 2023, or feature cosine, under a threshold calibrated on the private
  set). Threshold 0: a release holds no flagged copy, so a gate that only *flags* copies
  (``replication.action: flag``) passes only when it found none.
* ``lira_auc`` (``privacy.max_auc``) and ``lira_tpr_at_0.1pct_fpr`` (``privacy.max_tpr_at_0_1pct_fpr``):
  LiRA (Carlini et al. 2022, ``eval/lira.py``) against the Students trained on the dataset. The
  measured value is the *highest* over every Student (soft, hard labels), shadow mode and LiRA
  variant (online/offline, per-example/fixed variance): an adversary picks its strongest attack, so a
  release is as leaky as the leakiest measured one; the check names that attack. TPR at 0.1% FPR is
  the paper's headline figure (its argument: an attack is judged by its true-positive rate at low
  false-positive rates, where AUC says little). A threshold of None is not checked (its value is still recorded when
  the results exist).

A measured value passes when it is at most the threshold; NaN never passes. The verdict passes when
every checked value passes.
"""

from __future__ import annotations

import math

# Check name → the key of roc_metrics (eval/lira.py) it reads.
LIRA_CHECKS = {"lira_auc": "auc", "lira_tpr_at_0.1pct_fpr": "tpr_at_0.001_fpr"}


def student_lira_results(lira: dict) -> dict[str, dict]:
    """The Student rows of ``run_lira``'s summary (``metrics.json["lira"]``): key → result with ``variants``.

    A row says it is a Student with ``role: student``; rows written before the field existed are
    Students unless their key is ``teacher``.
    """
    targets = lira.get("targets")
    if not isinstance(targets, dict):
        raise ValueError("lira: expected run_lira's summary with a 'targets' mapping")
    return {k: r for k, r in targets.items() if r.get("role", "teacher" if k == "teacher" else "student") == "student"}


def worst_attack(results: dict[str, dict], metric: str) -> tuple[float, str]:
    """(highest value of ``metric`` over every result and LiRA variant, "<result key> <variant>" that reached it)."""
    best, where = -math.inf, ""
    for key in sorted(results):
        variants = results[key].get("variants") or {}
        for variant in sorted(variants):
            if metric not in variants[variant]:
                raise ValueError(f"lira: targets[{key!r}].variants[{variant!r}] has no {metric!r}")
            value = float(variants[variant][metric])
            if math.isnan(value) or value > best:
                best, where = value, f"{key} {variant}"
                if math.isnan(value):
                    return best, where
    if not where:
        raise ValueError("lira: no LiRA variant results for any Student")
    return best, where


def _check(measured: float | None, threshold: float | None, **detail) -> dict:
    checked = threshold is not None
    passed = None if not checked else (measured is not None and not math.isnan(measured) and measured <= threshold)
    return {"checked": checked, "passed": passed, "measured": measured, "threshold": threshold, **detail}


def release_verdict(replication: dict, student_lira: dict[str, dict] | None, max_auc: float | None = None,
                    max_tpr_at_0_1pct_fpr: float | None = None) -> dict:
    """The verdict: ``{"passed", "failed": [names], "checks": {name: {checked, passed, measured, threshold, …}}}``.

    ``replication``: the replication gate's summary (``run_replication``; needs ``copies`` and
    ``dropped``, reads ``images``, ``metric``, ``threshold``, ``action``). ``student_lira``: the Student
    rows of the LiRA results (``student_lira_results``), or None when LiRA did not run — then a set
    LiRA threshold is an error, since nothing could show the release is safe. ``max_auc`` and
    ``max_tpr_at_0_1pct_fpr``: thresholds in [0, 1], None = not checked.
    """
    for name, value in (("privacy.max_auc", max_auc), ("privacy.max_tpr_at_0_1pct_fpr", max_tpr_at_0_1pct_fpr)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name}: must lie in [0, 1] (got {value})")
    missing = [k for k in ("copies", "dropped") if k not in replication]
    if missing:
        raise ValueError(f"replication: the gate's summary lacks {missing}")
    left = int(replication["copies"]) - int(replication["dropped"])
    checks = {"replication": _check(left, 0, what="near-copies of private training images in the released dataset",
                                    **{k: replication.get(k) for k in ("images", "copies", "dropped", "action",
                                                                       "metric")},
                                    copy_threshold=replication.get("threshold"))}
    thresholds = {"lira_auc": max_auc, "lira_tpr_at_0.1pct_fpr": max_tpr_at_0_1pct_fpr}
    for name, metric in LIRA_CHECKS.items():
        if not student_lira:
            if thresholds[name] is not None:
                raise ValueError(f"privacy.{'max_auc' if name == 'lira_auc' else 'max_tpr_at_0_1pct_fpr'}: set, but "
                                 "there are no LiRA results for a Student to check it against")
            checks[name] = _check(None, None)
            continue
        value, attack = worst_attack(student_lira, metric)
        checks[name] = _check(value, thresholds[name], attack=attack, metric=metric)
    failed = [name for name, c in checks.items() if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks}
