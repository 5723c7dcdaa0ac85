"""Figures over training seeds (eval/seed_stats.py), the error-bar trade-off plot (plots.py) and the
shadow sets shared across training seeds (stages/privacy.py: without_training_seeds)."""

import math

import numpy as np
import pytest

from conftest import ROOT
from synthset.config import load_config
from synthset.plots import errorbar_series, save_tradeoff_errorbars
from synthset.eval.seed_stats import aggregate_seeds, format_mean_se, mean_se, seed_rows


def test_mean_se_is_sample_std_over_sqrt_n():
    mean, se, n = mean_se([0.60, 0.64, 0.65])
    assert n == 3 and mean == pytest.approx(0.63)
    assert se == pytest.approx(np.std([0.60, 0.64, 0.65], ddof=1) / math.sqrt(3))
    assert se == pytest.approx(0.0152752523, abs=1e-9)
    mean, se, n = mean_se([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(se)
    with pytest.raises(ValueError, match="no values"):
        mean_se([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_se([0.5, float("nan")])


def _metrics(seed: int, card: float = 1.0) -> dict:
    v = lambda auc: {"auc": auc, "tpr_at_0.001_fpr": auc / 10, "tpr_at_0.01_fpr": auc / 5}
    return {"cardinality": card, "teacher_accuracy": 0.80 + seed / 100, "student_soft_accuracy": 0.50 + seed / 100,
            "lira": {"targets": {
                "teacher": {"role": "teacher", "labels": None,
                            "variants": {"online": v(0.70 + seed / 100), "offline": v(0.65)}},
                "student-soft/classifier": {"role": "student", "labels": "soft",
                                            "variants": {"online": v(0.50), "offline": v(0.52 + seed / 100)}}}}}


def test_seed_rows_take_each_targets_accuracy_and_every_variant():
    rows = {r["target"]: r for r in seed_rows(_metrics(2), 2)}
    assert rows["teacher"]["accuracy"] == pytest.approx(0.82)
    assert rows["student-soft/classifier"]["accuracy"] == pytest.approx(0.52)
    assert rows["teacher"]["online_auc"] == pytest.approx(0.72)
    assert rows["teacher"]["offline_tpr_at_0.01_fpr"] == pytest.approx(0.13)
    assert rows["teacher"]["seed"] == 2 and rows["teacher"]["cardinality"] == 1.0
    with pytest.raises(ValueError, match="no LiRA"):
        seed_rows({"cardinality": 1.0}, 0)


def test_aggregate_seeds_groups_by_cardinality_and_target():
    rows = [r for s in (0, 1, 2) for r in seed_rows(_metrics(s), s)]
    rows += [r for s in (0, 1, 2) for r in seed_rows(_metrics(s, 5.0), s)]
    agg = {(a["cardinality"], a["target"]): a for a in aggregate_seeds(rows)}
    assert len(agg) == 4
    t = agg[(1.0, "teacher")]
    assert t["seeds"] == [0, 1, 2]
    assert t["online_auc"]["values"] == pytest.approx([0.70, 0.71, 0.72])
    assert t["online_auc"]["mean"] == pytest.approx(0.71)
    assert t["online_auc"]["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert t["offline_auc"]["se"] == pytest.approx(0.0)
    assert format_mean_se(t["online_auc"]) == "0.710 ± 0.006"
    assert "seed" not in t


def test_aggregate_seeds_rejects_inconsistent_seed_sets():
    rows = [r for s in (0, 1, 2) for r in seed_rows(_metrics(s), s)]
    with pytest.raises(ValueError, match="seed repeated"):
        aggregate_seeds(rows + seed_rows(_metrics(2), 2))
    other = [r for s in (0, 1) for r in seed_rows(_metrics(s, 5.0), s)]
    with pytest.raises(ValueError, match="differ"):
        aggregate_seeds(rows + other)
    broken = [dict(r) for r in rows]
    del broken[-1]["online_auc"]
    with pytest.raises(ValueError, match="online_auc missing for seed"):
        aggregate_seeds(broken)
    with pytest.raises(ValueError, match="nothing"):
        aggregate_seeds([])


def test_errorbar_series_carries_the_standard_errors(tmp_path):
    rows = [r for s in (0, 1, 2) for c in (5.0, 1.0) for r in seed_rows(_metrics(s, c), s)]
    agg = aggregate_seeds(rows)
    series = errorbar_series(agg, "online")
    t = series["teacher"]
    assert t["cardinality"] == [1.0, 5.0]
    assert t["auc"] == pytest.approx([0.71, 0.71])
    assert t["auc_se"] == pytest.approx([0.01 / math.sqrt(3)] * 2)
    assert t["accuracy_se"] == pytest.approx([0.01 / math.sqrt(3)] * 2)
    assert t["n"] == [3, 3]
    assert errorbar_series(agg, "offline")["student-soft/classifier"]["auc_se"][0] > 0
    one = aggregate_seeds(seed_rows(_metrics(0), 0))  # one seed: NaN SE, no bar
    assert errorbar_series(one)["teacher"]["auc_se"] == [0.0]
    with pytest.raises(ValueError, match="online_fixed_var_auc"):
        errorbar_series(agg, "online_fixed_var")
    save_tradeoff_errorbars(agg, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000


def test_shadow_sets_do_not_depend_on_the_training_seeds():
    from synthset.stages.privacy import shadow_dir

    base = load_config(None, ["data.splits.holdout=10", "output.root=/tmp/x"])
    seeded = load_config(None, ["data.splits.holdout=10", "output.root=/tmp/x", "teacher.seed=2", "student.seed=3"])
    assert shadow_dir(base, base.privacy).uri == shadow_dir(seeded, seeded.privacy).uri
    longer = load_config(None, ["data.splits.holdout=10", "output.root=/tmp/x", "teacher.epochs=30"])
    assert shadow_dir(base, base.privacy).uri != shadow_dir(longer, longer.privacy).uri
    other = base.privacy.model_copy(update={"seed": 1})
    assert shadow_dir(base, base.privacy).uri != shadow_dir(base, other).uri


def test_privacy_config_teacher_is_converged_and_shadows_share_its_recipe():
    """conf/privacy.yaml (issue 14): a Teacher fitted to convergence (no augmentation, no weight decay, many
    steps) whose recipe the shadows repeat; the Student keeps the quickstart's Student recipe."""
    from synthset.stages.privacy import classifier_shadow_set

    cfg = load_config(ROOT / "conf" / "privacy.yaml")
    t = cfg.teacher
    assert (t.augment, t.weight_decay) == (False, 0.0)
    private = cfg.data.splits.private - cfg.data.splits.holdout
    assert t.epochs * math.ceil(private / t.batch_size) >= 200  # optimizer steps: enough to fit the split
    assert cfg.student.augment and cfg.student.epochs == 15 and cfg.student.batch_size == 128
    for target in (None, cfg.student):
        assert classifier_shadow_set(cfg, cfg.privacy, target).cfg.teacher == t
