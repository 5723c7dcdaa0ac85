"""The replication gate stage, the holdout split, the pipeline-mode shadow and jobs/evaluate.py.

Everything runs on sklearn's digits (8×8): a Teacher and Students trained in about a second stand in
for the pipeline's, and a synthetic dataset of noisy private images (plus one exact copy) stands in
for a generator's output, written with the real shard writer.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from synthset.config import load_config, stage_hash
from synthset.data.splits import make_splits, split_indices

OVERRIDES = ["data.source=digits", "data.image_size=8", "foundation.arch.image_size=8", "data.splits.public=50",
             "data.splits.private=300", "data.splits.holdout=60", "teacher.width=8", "teacher.epochs=20",
             "teacher.batch_size=32", "teacher.augment=false", "teacher.lr=0.005", "student.width=8",
             "student.epochs=4", "student.batch_size=32", "student.augment=false", "replication.tile=4",
             "evaluate.sample_size=100", "evaluate.kid_subset_size=50", "evaluate.kid_subsets=5",
             "privacy.num_shadows=4", "privacy.num_candidates=40", "privacy.query_shift=0",
             "ray.num_cpus=2", "tracking.enabled=false"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def digits_cfg(tmp_path):
    return load_config(None, [f"output.root={tmp_path / 'runs'}", *OVERRIDES])


def test_holdout_is_disjoint_seeded_and_leaves_private_unchanged_without_it(digits_cfg):
    splits = make_splits(digits_cfg.data)
    assert len(splits.private) == 240 and len(splits.holdout) == 60
    assert not set(splits.private_index) & set(splits.holdout_index)
    _, pool = split_indices(1437, 50, 300, 0)
    assert np.array_equal(np.sort(np.r_[splits.private_index, splits.holdout_index]), pool)
    assert np.array_equal(make_splits(digits_cfg.data).holdout_index, splits.holdout_index)
    assert splits.record()["holdout"] == splits.holdout_index.tolist()
    no_holdout = digits_cfg.model_copy(deep=True)
    no_holdout.data.splits.holdout = 0
    plain = make_splits(no_holdout.data)
    assert np.array_equal(plain.private_index, pool) and plain.holdout is None
    # The holdout changes what the Teacher sees (its hash); holdout 0 is hashed as if the field did not exist.
    assert stage_hash(no_holdout, "teacher") != stage_hash(digits_cfg, "teacher")
    d = no_holdout.to_dict()
    d["data"]["splits"].pop("holdout")
    assert "holdout" not in json.dumps(d["data"]["splits"])
    with pytest.raises(ValueError, match="holdout"):
        load_config(None, [*OVERRIDES, "data.splits.holdout=295"])
    with pytest.raises(ValueError, match="replication.tile"):
        load_config(None, [*OVERRIDES, "replication.tile=3"])


def _fake_pipeline(cfg, copy_row: int = 7):
    """Teacher, labelled synthetic dataset (with an exact copy of private image ``copy_row``), Students."""
    from synthset import storage
    from synthset.data.shards import write_manifest, write_shard
    from synthset.data.splits import fit_images, to_unit_tensor
    from synthset.eval.classification import classification_report
    from synthset.models.classifiers import save_classifier
    from synthset.models.training import predict_proba
    from synthset.stages.classifier import student_dir, teacher_dir
    from synthset.eval.shadow_training import fit_recipe as _fit
    from synthset.stages.synthesize import label_dir

    splits = make_splits(cfg.data)
    names = splits.class_names
    x_test = to_unit_tensor(fit_images(splits.test.images, 8))

    def save(stage, model, ccfg):
        stage.begin(cfg)
        save_classifier(model, stage.uri, ccfg, 10, 1)
        acc = classification_report(splits.test.labels, predict_proba(model, x_test), names)["accuracy"]
        stage.complete({"model": stage.uri, "test_accuracy": acc})

    x = to_unit_tensor(splits.private.images)
    teacher = _fit(cfg.teacher, 10, x, torch.from_numpy(splits.private.labels), 0, "teacher")
    save(teacher_dir(cfg), teacher, cfg.teacher)

    rng = np.random.default_rng(0)
    rows = rng.choice(len(splits.private), 80)
    noisy = np.clip(splits.private.images[rows].astype(int) + rng.integers(-90, 90, (80, 8, 8)), 0, 255)
    images = np.concatenate([noisy.astype(np.uint8), splits.private.images[copy_row:copy_row + 1]])
    classes = np.r_[splits.private.labels[rows], splits.private.labels[copy_row]]
    soft = predict_proba(teacher, to_unit_tensor(images))
    label = label_dir(cfg)
    label.begin(cfg)
    data = label.path("data")
    samples = [{"key": f"img{i:04d}", "image": im, "cls": int(c), "meta": {"i": i}, "soft": p}
               for i, (im, c, p) in enumerate(zip(images, classes, soft))]
    stats = [write_shard(data, 0, samples[:40]), write_shard(data, 1, samples[40:])]
    write_manifest(data, {"class_names": names, "method": "class_prompt", "generator": "test"}, stats)
    label.complete({"dataset": data, "num_samples": len(samples), "teacher_agreement": 0.5})
    xs, ys = to_unit_tensor(images), torch.from_numpy(classes)
    for labels in cfg.student.labels:
        student = _fit(cfg.student, 10, xs, ys, 1, f"student-{labels}",
                       torch.from_numpy(soft) if labels == "soft" else None, cfg.student.temperature)
        save(student_dir(cfg, labels), student, cfg.student)
    return data, splits.private_index[copy_row], f"img{len(images) - 1:04d}"


def test_gate_flags_and_drop_removes_an_exact_copy_before_the_student(digits_cfg):
    from synthset.data.shards import ShardDataset, iter_shard, read_manifest
    from synthset.stages.evaluate import run_replication, student_training_set

    data, real_index, copy_key = _fake_pipeline(digits_cfg)
    flagged = run_replication(digits_cfg, data)
    assert flagged["copies"] >= 1 and flagged["dataset"] == data and flagged["dropped"] == 0
    audit = open(flagged["audit"]).read().splitlines()
    assert audit[0] == "key,real_index,metric,score,is_copy" and len(audit) == 1 + 81
    row = next(line.split(",") for line in audit if line.startswith(copy_key))
    # A copy's distance is √(max(0, |q|² + |r|² − 2q·r)/16) per tile, in float32: terms ≤ 32 round by
    # ~ulp(32) ≈ 4e-6, so it is ≲ 1e-3, not 0 (seen up to 4.2e-4); distinct digits are ≥ 0.09 apart.
    assert int(row[1]) == real_index and float(row[3]) < 2e-3 and row[4] == "True"
    assert run_replication(digits_cfg, data)["reused"]

    drop = digits_cfg.model_copy(deep=True)
    drop.replication.action = "drop"
    assert stage_hash(drop, "student") != stage_hash(digits_cfg, "student")  # the Student's data changes
    gated = student_training_set(drop, data)
    assert gated != data
    manifest = read_manifest(gated)
    assert manifest["num_samples"] == 81 - flagged["copies"]
    assert manifest["replication"]["dropped"] == flagged["copies"] and manifest["replication"]["images"] == 81
    keys = [s["key"] for shard in manifest["shards"] for s in iter_shard(f"{gated}/{shard['shard']}")]
    assert copy_key not in keys and len(keys) == len(set(keys))
    assert len(list(ShardDataset(gated, image_size=8, channels=1))) == manifest["num_samples"]
    assert student_training_set(digits_cfg.model_copy(update={"replication": drop.replication.model_copy(
        update={"enabled": False})}), data) == data



def test_gate_with_a_faiss_index_gives_the_exact_verdicts_and_records_the_index(digits_cfg):
    """replication.index: faiss through the stage: the driver builds the index, the shard workers load it
    from the chunk store (files here, Ray's object store in a cluster) and re-rank its candidates."""
    pytest.importorskip("faiss")
    from synthset.stages.evaluate import run_replication

    data, real_index, copy_key = _fake_pipeline(digits_cfg)
    exact = run_replication(digits_cfg, data)
    cfg = digits_cfg.model_copy(deep=True)
    cfg.replication.index, cfg.replication.index_min_private = "faiss", 2
    indexed = run_replication(cfg, data)
    assert indexed["audit"] != exact["audit"]  # its own stage directory
    assert indexed["threshold"] == exact["threshold"] and "index" not in exact
    assert indexed["index"]["nlist"] == 6 and indexed["index"]["vectors"] == 240  # default_nlist(240) = 240 // 39
    rows = lambda summary: {line.split(",")[0]: line.split(",") for line in open(summary["audit"]).read().splitlines()}
    exact_rows, indexed_rows = rows(exact), rows(indexed)
    assert int(indexed_rows[copy_key][1]) == real_index and indexed_rows[copy_key][4] == "True"
    # 81 images, 240 private, all 6 cells probed, 32 candidates re-ranked: measured 81 of 81 nearest images and
    # verdicts as the exact search's (the bound leaves 4 for float ties at the 32nd candidate on another CPU).
    assert {k: r[4] for k, r in indexed_rows.items()} == {k: r[4] for k, r in exact_rows.items()}
    assert np.mean([indexed_rows[k][1] == exact_rows[k][1] for k in exact_rows if k != "key"]) >= 0.95

def test_pipeline_shadow_function_on_tiny_data(digits_cfg, monkeypatch):
    from synthset.data.splits import to_unit_tensor
    from synthset.eval.membership import draw_candidates, shadow_train_index
    from synthset.stages.privacy import candidate_pool
    from synthset.stages import privacy as privacy_stage
    from synthset.stages.privacy import train_shadow_classifier, train_shadow_pipeline

    data, _, _ = _fake_pipeline(digits_cfg)
    calls, real = [], privacy_stage.pipeline_shadow_logits

    def spy(*args, **kwargs):  # records what the shadow's Teacher and Student actually receive
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(privacy_stage, "pipeline_shadow_logits", spy)
    images, labels, num_private, _ = candidate_pool(digits_cfg)
    assert num_private == 240 and len(images) == 300
    cand = draw_candidates(num_private, digits_cfg.privacy, len(images) - num_private)
    assert len(cand) == 40 and (cand >= num_private).sum() == 20  # half holdout (OUT), half private (IN)
    keep_row = np.arange(40) % 2 == 0
    train = shadow_train_index(num_private, cand, keep_row)
    assert not set(train) & set(cand[~keep_row]) and set(cand[keep_row]) <= set(train)
    held_out_of_shadow = set(range(num_private, len(images))) - set(cand[keep_row])
    assert not set(train) & held_out_of_shadow and len(train) == num_private - 20 + 20
    privacy = digits_cfg.privacy
    for labels_kind in ("soft", "hard"):
        logits = train_shadow_pipeline(digits_cfg, privacy, train, cand, 0, 5, dataset=data, labels=labels_kind)
        assert logits.shape == (40, 1, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()
    # The shadow trains on exactly its half of the pool (OUT candidates must not leak in, or LiRA's
    # OUT distribution is an IN one) and is queried on exactly the candidates, in their order.
    # pipeline_shadow_logits(teacher, student, T, C, x_half, y_half, x_synth, y_synth, x_query, labels, ...)
    assert len(calls) == 2
    for args, labels_kind in zip(calls, ("soft", "hard")):
        assert args[3] == 10 and args[9] == labels_kind
        exact = functools.partial(torch.testing.assert_close, rtol=0, atol=0)
        # Training images travel as uint8 (the recipes convert a batch at a time); queries as floats.
        assert args[4].dtype == np.uint8, "the shadow half is held as uint8"
        np.testing.assert_array_equal(args[4], images[train], err_msg="shadow half images")
        exact(args[5], torch.from_numpy(labels[train]), msg=lambda m: f"shadow half labels: {m}")
        exact(args[8], to_unit_tensor(images[cand]), msg=lambda m: f"queries: {m}")
        # The synthetic set is _fake_pipeline's: 80 noisy images, then the exact copy of pool row 7.
        assert args[6].shape == (81, 8, 8) and args[6].dtype == np.uint8 and args[7].shape == (81,)
        assert np.array_equal(args[6][-1], images[7]) and int(args[7][-1]) == labels[7]
    again = train_shadow_pipeline(digits_cfg, privacy, train, cand, 0, 5, dataset=data, labels="soft")
    np.testing.assert_allclose(again, train_shadow_pipeline(digits_cfg, privacy, train, cand, 0, 5, dataset=data,
                                                            labels="soft"), atol=1e-5)
    assert train_shadow_classifier(digits_cfg, privacy, train, cand, 0, 5).shape == (40, 1, 10)
    with pytest.raises(ValueError, match="labels"):
        train_shadow_pipeline(digits_cfg, privacy, train, cand, 0, 5, dataset=data, labels="fuzzy")


@pytest.mark.slow
def test_evaluate_job_writes_metrics_report_audit_and_lira(digits_cfg, tmp_path):
    _fake_pipeline(digits_cfg)
    conf = tmp_path / "eval.yaml"
    raw = digits_cfg.to_dict()
    raw["privacy"].update({"enabled": True, "shadow_modes": ["classifier", "pipeline"]})
    conf.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--config", str(conf)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = next((tmp_path / "runs" / "evaluate").glob("*/"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "precision", "recall", "density", "coverage", "recognizability", "diversity"):
        assert np.isfinite(metrics["generative"][key]), key
    assert metrics["replication"]["copies"] >= 1 and metrics["private_images"] == 240
    targets = metrics["lira"]["targets"]
    assert set(targets) == {"teacher", "student-soft/classifier", "student-soft/pipeline",
                            "student-hard/classifier", "student-hard/pipeline"}
    assert metrics["lira"]["members"] == 20 and metrics["lira"]["num_candidates"] == 40
    # Teacher and Students of one architecture share the classifier shadows.
    assert targets["teacher"]["shadow_set"] == targets["student-soft/classifier"]["shadow_set"]
    assert set(targets["teacher"]["variants"]) == {"online", "online_fixed_var", "offline", "offline_fixed_var"}
    report = (out / "report.md").read_text()
    assert "Membership inference" in report and "Replication gate" in report and "FID" not in report.split("##")[0]
    for png in ("samples_per_class.png", "roc_loglog.png", "roc_loglog_offline.png"):
        assert (out / png).stat().st_size > 1000
    assert (next((tmp_path / "runs" / "replication").glob("*/")) / "replication_audit.csv").exists()
    # Rerun: everything reused, no shadow trained again.
    again = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--config", str(conf)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and '"reused": true' in again.stdout

    from synthset.stages.report import save_tradeoff_plot, tradeoff_rows, tradeoff_table

    rows = tradeoff_rows([metrics])
    assert len(rows) == 5 and "student-soft/pipeline" in tradeoff_table(rows)
    save_tradeoff_plot(rows, str(tmp_path / "tradeoff.png"))
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
