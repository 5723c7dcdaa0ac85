"""Runs the real jobs/pipeline.py on conf/tiny.yaml (Fashion-MNIST) and checks what it wrote."""

import hashlib
import os
import json
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("fashion_mnist")]


def run_pipeline(root, *extra):
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
           "--set", f"output.root={root}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


# conf/tiny.yaml's Teacher takes 8 steps (1000 images, batch 128) and ends at chance (0.10 for 6 of 8 seeds,
# at most 0.19). The same epoch in batches of 16 (63 steps, the same compute) reaches 0.48–0.57 on the
# 10,000 test images over Teacher seeds 0–9 (seed 0: 0.504), and 0.05–0.15 with the labels shuffled:
# a bound of 0.3 sits ~7 standard deviations (0.025) below the worst seed and 0.15 above shuffled labels.
TEACHER_LEARNS = ("--set", "teacher.batch_size=16")
TEACHER_MIN_ACCURACY = 0.3


def test_pipeline_end_to_end_and_rerun_does_no_duplicate_work(tmp_path):
    root = tmp_path / "run"
    out = run_pipeline(root, *TEACHER_LEARNS)
    assert "=== synthset pipeline summary ===" in out
    summary = json.loads(next(root.glob("summary-*.json")).read_text())
    assert 0.0 <= summary["student_soft_accuracy"] <= 1.0 and 0.0 <= summary["teacher_accuracy"] <= 1.0
    # The Teacher learned its labels (a shuffled image/label pairing stays near 0.1). The Students learn
    # 60 images of a generator pretrained for 20 steps: no accuracy of theirs is evidence of anything.
    assert summary["teacher_accuracy"] > TEACHER_MIN_ACCURACY, summary["teacher_accuracy"]
    assert summary["images"] == 60

    # Shards and manifest as the contract says; checksums match; keys unique.
    manifest = json.loads((root / "synthesis").glob("*/data/manifest.json").__next__().read_text())
    data = next((root / "synthesis").glob("*/data"))
    assert manifest["num_samples"] == 60 and len(manifest["shards"]) == 3 and manifest["complete"]
    for entry in manifest["shards"]:
        assert hashlib.sha256((data / entry["shard"]).read_bytes()).hexdigest() == entry["sha256"]
    labelled = json.loads(next((root / "label").glob("*/data/manifest.json")).read_text())
    assert labelled["num_samples"] == 60 and "teacher" in labelled

    # The foundation model is a diffusers pipeline of safetensors files, loadable by path.
    model = next((root / "foundation").glob("*/model"))
    assert (model / "model_index.json").exists() and list(model.rglob("*.safetensors"))
    splits = json.loads(next((root / "teacher").glob("*/splits.json")).read_text())
    assert len(splits["private"]) == 1000 and not set(splits["private"]) & set(splits["public"])
    for stage in ("foundation", "teacher", "synthesis", "label", "student-soft", "student-hard"):
        stage_dir = next((root / stage).iterdir())
        assert (stage_dir / "_SUCCESS.json").exists() and (stage_dir / "config.yaml").exists()

    # MLflow: a parent run and nested stage runs with metrics, in the SQLite store under the root.
    db = sqlite3.connect(root / "mlflow.db")
    runs = dict(db.execute("select run_uuid, name from runs").fetchall())
    assert any(n.endswith("-pipeline") for n in runs.values())
    assert {"foundation", "teacher", "student-soft", "student-hard", "evaluate"} <= set(runs.values())
    assert db.execute("select count(*) from metrics where key='test_accuracy'").fetchone()[0] >= 3

    # A second run reuses everything: no stage reruns, shard bytes unchanged.
    before = {p: p.stat().st_mtime_ns for p in data.glob("*.tar")}
    out2 = run_pipeline(root, *TEACHER_LEARNS)
    assert out2.count("reusing") >= 6 and "pretraining" not in out2 and "generated in" not in out2
    assert {p: p.stat().st_mtime_ns for p in data.glob("*.tar")} == before


def test_missing_dataset_fails_fast_naming_the_places(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config",
                           str(ROOT / "conf" / "tiny.yaml"), "--set", f"output.root={tmp_path / 'runs'}",
                           "--set", "data.download=false", "--set", f"data.root={tmp_path / 'none'}",
                           "--set", "data.source=fashion_mnist"],
                          capture_output=True, text=True, timeout=60,
                          # HOME is tmp_path, so the run's root is a folder below it (a home directory itself is
                          # refused as output.root)
                          env={**os.environ, "SYNTHSET_FMNIST_DEBIAN_DIR": str(tmp_path / "x"), "HOME": str(tmp_path)})
    assert proc.returncode == 2
    # Failed before any work: no stage began (a stage writes its config.yaml first).
    assert not [p for p in tmp_path.rglob("*") if p.name in ("config.yaml", "_SUCCESS.json")]
    assert str(tmp_path / "none") in proc.stderr and "data.root" in proc.stderr
