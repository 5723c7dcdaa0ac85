"""The release verdict (eval/release.py): a plain function of the measured replication and LiRA results
and the thresholds."""

from __future__ import annotations

import math

import pytest

from synthset.eval.release import release_verdict, student_lira_results, worst_attack

CLEAN = {"images": 100, "copies": 0, "dropped": 0, "action": "flag", "metric": "tiled_l2", "threshold": 0.12}


def lira_row(auc_by_variant: dict, tpr_by_variant: dict | None = None, role: str = "student") -> dict:
    tpr_by_variant = tpr_by_variant or {v: 0.0 for v in auc_by_variant}
    return {"role": role, "variants": {v: {"auc": a, "tpr_at_0.001_fpr": tpr_by_variant[v], "tpr_at_0.01_fpr": 0.0}
                                       for v, a in auc_by_variant.items()}}


STUDENTS = {"student-soft/classifier": lira_row({"online": 0.52, "offline": 0.55}, {"online": 0.0, "offline": 0.004}),
            "student-hard/classifier": lira_row({"online": 0.49, "offline": 0.51}, {"online": 0.002, "offline": 0.0})}


def test_pass_records_every_check_with_its_measured_value_and_threshold():
    v = release_verdict(CLEAN, STUDENTS, max_auc=0.6, max_tpr_at_0_1pct_fpr=0.01)
    assert v["passed"] and v["failed"] == []
    expected = {"checked": True, "passed": True, "measured": 0, "threshold": 0}
    assert v["checks"]["replication"].items() >= expected.items()
    auc = v["checks"]["lira_auc"]
    assert (auc["measured"], auc["threshold"], auc["passed"]) == (0.55, 0.6, True)
    assert auc["attack"] == "student-soft/classifier offline"  # the strongest attack is the one reported
    tpr = v["checks"]["lira_tpr_at_0.1pct_fpr"]
    assert (tpr["measured"], tpr["threshold"], tpr["passed"]) == (0.004, 0.01, True)
    # A value equal to its threshold passes ("at most").
    assert release_verdict(CLEAN, STUDENTS, max_auc=0.55, max_tpr_at_0_1pct_fpr=0.004)["passed"]


def test_fail_on_auc():
    v = release_verdict(CLEAN, STUDENTS, max_auc=0.53, max_tpr_at_0_1pct_fpr=0.01)
    assert not v["passed"] and v["failed"] == ["lira_auc"]
    assert v["checks"]["lira_auc"]["measured"] == 0.55 and v["checks"]["lira_auc"]["passed"] is False
    assert v["checks"]["lira_tpr_at_0.1pct_fpr"]["passed"] is True


def test_fail_on_tpr_at_low_fpr():
    v = release_verdict(CLEAN, STUDENTS, max_auc=0.6, max_tpr_at_0_1pct_fpr=0.003)
    assert not v["passed"] and v["failed"] == ["lira_tpr_at_0.1pct_fpr"]
    tpr = v["checks"]["lira_tpr_at_0.1pct_fpr"]
    assert (tpr["measured"], tpr["attack"]) == (0.004, "student-soft/classifier offline")


def test_fail_on_replication_unless_the_copies_were_dropped():
    flagged = {**CLEAN, "copies": 2}
    v = release_verdict(flagged, STUDENTS, max_auc=0.6)
    assert not v["passed"] and v["failed"] == ["replication"]
    assert v["checks"]["replication"]["measured"] == 2 and v["checks"]["replication"]["copies"] == 2
    dropped = release_verdict({**flagged, "dropped": 2, "action": "drop"}, STUDENTS, max_auc=0.6)
    assert dropped["passed"] and dropped["checks"]["replication"]["measured"] == 0
    # Replication is checked even when no LiRA threshold is set.
    assert release_verdict(flagged, None)["failed"] == ["replication"]


def test_unset_thresholds_are_recorded_not_checked():
    leaky = {"student-soft/pipeline": lira_row({"online": 0.95}, {"online": 0.6})}
    v = release_verdict(CLEAN, leaky)
    assert v["passed"]
    assert v["checks"]["lira_auc"].items() >= {"checked": False, "passed": None, "measured": 0.95,
                                               "threshold": None}.items()
    assert release_verdict(CLEAN, leaky, max_auc=0.9)["failed"] == ["lira_auc"]
    assert release_verdict(CLEAN, None)["checks"]["lira_auc"]["measured"] is None


def test_nan_never_passes_and_bad_input_names_the_field():
    nan = {"student-soft/classifier": lira_row({"online": math.nan, "offline": 0.5})}
    assert release_verdict(CLEAN, nan, max_auc=0.6)["failed"] == ["lira_auc"]
    with pytest.raises(ValueError, match="privacy.max_auc: set, but there are no LiRA results"):
        release_verdict(CLEAN, None, max_auc=0.6)
    with pytest.raises(ValueError, match="privacy.max_tpr_at_0_1pct_fpr: set"):
        release_verdict(CLEAN, {}, max_tpr_at_0_1pct_fpr=0.01)
    with pytest.raises(ValueError, match=r"privacy.max_auc: must lie in \[0, 1\]"):
        release_verdict(CLEAN, STUDENTS, max_auc=1.5)
    with pytest.raises(ValueError, match="replication: the gate's summary lacks"):
        release_verdict({"images": 3}, STUDENTS)


def test_student_rows_are_chosen_by_role():
    lira = {"targets": {"teacher": lira_row({"online": 0.9}, role="teacher"), **STUDENTS}}
    assert set(student_lira_results(lira)) == set(STUDENTS)
    old = {"targets": {k: {"variants": r["variants"]} for k, r in lira["targets"].items()}}  # before "role" existed
    assert set(student_lira_results(old)) == set(STUDENTS)
    assert worst_attack(student_lira_results(lira), "auc") == (0.55, "student-soft/classifier offline")
