"""The privacy-gated export (stages/export.py, jobs/export.py): it publishes only what passes, with the
verdict in the manifest, and rejects bad settings or missing records before copying anything.

The records the export reads (the replication gate's summary, the evaluation's LiRA results, a
labelled dataset) are written here with the real stage directories and shard writer, so no model trains.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from synthset import storage
from synthset.config import load_config, stage_hash
from synthset.data.shards import ShardDataset, read_manifest, write_manifest, write_shard

OVERRIDES = ["data.source=digits", "data.image_size=8", "foundation.arch.image_size=8", "data.splits.public=50",
             "data.splits.private=300", "data.splits.holdout=60", "replication.tile=4", "privacy.enabled=true",
             "privacy.max_auc=0.6", "privacy.max_tpr_at_0_1pct_fpr=0.01", "tracking.enabled=false"]


def make_cfg(tmp_path, *extra):
    return load_config(None, [f"output.root={tmp_path / 'runs'}", *OVERRIDES, *extra])


def write_records(cfg, tmp_path, copies: int = 0, dropped: int = 0, student_auc: float = 0.55,
                  student_tpr: float = 0.004) -> str:
    """A labelled dataset (2 shards), the replication gate's summary and the evaluation's LiRA results."""
    from synthset.stages.evaluate import evaluate_dir, replication_dir

    rng = np.random.default_rng(0)
    dataset = str(tmp_path / "labelled")
    samples = [{"key": f"img{i:04d}", "image": rng.integers(0, 255, (8, 8), dtype=np.uint8), "cls": i % 3,
                "meta": {"i": i}, "soft": np.full(3, 1 / 3)} for i in range(10)]
    stats = [write_shard(dataset, 0, samples[:6]), write_shard(dataset, 1, samples[6:])]
    write_manifest(dataset, {"class_names": ["a", "b", "c"], "method": "class_prompt", "config_hash": "label"}, stats)
    rep = replication_dir(cfg)
    rep.begin(cfg)
    rep.complete({"dataset": dataset, "images": 10, "copies": copies, "dropped": dropped, "metric": "tiled_l2",
                  "threshold": 0.12, "action": "drop" if dropped else "flag"})
    ev = evaluate_dir(cfg)
    ev.begin(cfg)
    row = lambda role, auc, tpr: {"role": role, "shadow_mode": "classifier", "variants": {
        v: {"auc": auc - d, "tpr_at_0.001_fpr": tpr - d / 100, "tpr_at_0.01_fpr": 0.02} for v, d in
        (("online", 0.02), ("offline", 0.0))}}
    targets = {"teacher": row("teacher", 0.9, 0.5),  # leaky, but the Teacher is not released, so not gated
               "student-soft/classifier": row("student", student_auc, student_tpr),
               "student-hard/classifier": row("student", 0.5, 0.0)}
    metrics = {"lira": {"num_shadows": 16, "targets": targets}}
    storage.write_json(ev.path("metrics.json"), metrics)
    ev.complete({"metrics": ev.path("metrics.json")})
    return dataset


def test_a_passing_dataset_is_published_with_its_verdict(tmp_path):
    from synthset.stages.export import export_dir, run_export

    cfg = make_cfg(tmp_path)
    source = write_records(cfg, tmp_path)
    summary = run_export(cfg)
    dest = export_dir(cfg).path("data")
    assert summary["passed"] and summary["dataset"] == dest and summary["num_samples"] == 10
    manifest = read_manifest(dest)
    release = manifest["release"]
    assert release["passed"] and release["failed"] == [] and manifest["source"] == source
    assert {k: (c["measured"], c["threshold"]) for k, c in release["checks"].items()} == {
        "replication": (0, 0), "lira_auc": (0.55, 0.6), "lira_tpr_at_0.1pct_fpr": (0.004, 0.01)}
    assert manifest["class_names"] == ["a", "b", "c"] and manifest["config_hash"] == export_dir(cfg).hash
    src = read_manifest(source)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in src["shards"]]
    assert manifest["totals_per_class"] == src["totals_per_class"]
    assert len(list(ShardDataset(dest, image_size=8, channels=1))) == 10
    assert run_export(cfg)["reused"]


@pytest.mark.parametrize("records, failed", [({"student_auc": 0.7}, ["lira_auc"]),
                                             ({"student_tpr": 0.05}, ["lira_tpr_at_0.1pct_fpr"]),
                                             ({"copies": 1}, ["replication"])])
def test_a_failing_verdict_publishes_nothing(tmp_path, records, failed):
    from synthset.stages.export import export_dir, run_export

    cfg = make_cfg(tmp_path, f"privacy.export_to={tmp_path / 'release'}")
    write_records(cfg, tmp_path, **records)
    summary = run_export(cfg)
    assert not summary["passed"] and summary["failed"] == failed and summary["dataset"] is None
    assert not (tmp_path / "release").exists()  # nothing at the destination, least of all a manifest
    stage = export_dir(cfg)
    assert not stage.is_complete()
    verdict = json.loads(open(stage.path("verdict.json")).read())
    assert verdict["failed"] == failed and verdict["checks"][failed[0]]["passed"] is False


def test_dropped_copies_pass_and_unset_thresholds_need_no_evaluation(tmp_path):
    from synthset.stages.evaluate import evaluate_dir
    from synthset.stages.export import run_export

    cfg = make_cfg(tmp_path, "privacy.max_auc=null", "privacy.max_tpr_at_0_1pct_fpr=null")
    write_records(cfg, tmp_path, copies=2, dropped=2)
    storage.delete_dir_contents(evaluate_dir(cfg).uri)
    summary = run_export(cfg)
    assert summary["passed"]
    checks = read_manifest(summary["dataset"])["release"]["checks"]
    assert checks["replication"]["measured"] == 0 and checks["replication"]["dropped"] == 2
    assert not checks["lira_auc"]["checked"] and checks["lira_auc"]["measured"] is None


def test_the_thresholds_do_not_change_the_evaluation_hash(tmp_path):
    plain = load_config(None, [f"output.root={tmp_path}", *OVERRIDES[:-3], "tracking.enabled=false"])
    gated = make_cfg(tmp_path, f"privacy.export_to={tmp_path / 'release'}")
    assert stage_hash(plain, "evaluate") == stage_hash(gated, "evaluate")
    from synthset.stages.export import export_dir

    assert export_dir(plain).hash != export_dir(gated).hash


@pytest.mark.parametrize("extra, message", [
    (["replication.enabled=false"], "replication.enabled: false"),
    (["privacy.enabled=false"], "privacy.max_auc: a LiRA threshold needs the Student's LiRA results"),
    (["data.splits.holdout=0"], "privacy.max_auc: LiRA on the Student needs known non-members"),
    (["privacy.max_auc=null", "privacy.enabled=false"], "privacy.max_tpr_at_0_1pct_fpr: a LiRA threshold"),
])
def test_bad_settings_fail_naming_the_field(tmp_path, extra, message):
    from synthset.stages.export import run_export

    with pytest.raises(ValueError, match=message):
        run_export(make_cfg(tmp_path, *extra))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_thresholds_are_validated_to_lie_in_0_1(tmp_path, value):
    for field in ("max_auc", "max_tpr_at_0_1pct_fpr"):
        with pytest.raises(ValueError, match=f"privacy.{field}"):
            make_cfg(tmp_path, f"privacy.{field}={value}")


def test_missing_records_and_a_foreign_destination_fail_before_copying(tmp_path):
    from synthset.stages.evaluate import evaluate_dir, replication_dir
    from synthset.stages.export import check_export_inputs, run_export

    cfg = make_cfg(tmp_path, f"privacy.export_to={tmp_path / 'release'}")
    with pytest.raises(FileNotFoundError, match=f"{replication_dir(cfg).uri}/_SUCCESS.json: the replication gate"):
        run_export(cfg)
    source = write_records(cfg, tmp_path)
    storage.delete_dir_contents(evaluate_dir(cfg).uri)
    with pytest.raises(FileNotFoundError, match=f"{evaluate_dir(cfg).uri}/_SUCCESS.json: no evaluation"):
        run_export(cfg)
    write_records(cfg, tmp_path)
    write_manifest(str(tmp_path / "release"), {"config_hash": "someone-else"}, [])
    with pytest.raises(ValueError, match="privacy.export_to: .*release/manifest.json already holds another dataset"):
        check_export_inputs(cfg)
    (tmp_path / "release" / "manifest.json").unlink()
    # A shard that no longer matches the source manifest is not published (and no manifest is written).
    (tmp_path / "labelled" / "shard-000001.tar").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="shard-000001.tar: sha256 differs"):
        run_export(cfg)
    assert not (tmp_path / "release" / "manifest.json").exists() and source


def test_export_job_from_a_config(tmp_path):
    cfg = make_cfg(tmp_path)
    write_records(cfg, tmp_path)
    conf = tmp_path / "export.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--config", str(conf), *args],
                                       capture_output=True, text=True, timeout=300)
    ok = run()
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    assert "privacy gate passed" in ok.stdout and '"passed": true' in ok.stdout
    failing = run("--set", "privacy.max_auc=0.5", "--set", f"privacy.export_to={tmp_path / 'strict'}")
    assert failing.returncode == 1 and "privacy gate FAILED" in failing.stdout and not (tmp_path / "strict").exists()
    bad = run("--set", "replication.enabled=false")
    assert bad.returncode == 2 and "error: replication.enabled" in bad.stderr
