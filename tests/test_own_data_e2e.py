"""Runs the real jobs/pipeline.py on a user's RGB image folder (odd files included) with a tiny config,
and a production-shaped run: a 3-channel Stable-Diffusion-layout pipeline loaded by path at 64 px."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_prepare import make_rgb_folder
from test_rcdm import assert_filter_kept_the_middle_band

pytestmark = pytest.mark.slow

OWN_DATA = ["data.source=image_folder", "data.channels=3", "data.on_bad_image=skip", "data.public_shift=none",
            "data.splits.public=40", "data.splits.private=40", "synthesis.images_per_class=4"]


def run_pipeline(root, folder, *extra):
    sets = [f"output.root={root}", f"data.path={folder}", *OWN_DATA, *extra]
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


# conf/tiny.yaml's Teacher takes one step on the 40 private images (batch 128) and stays at chance (1/3).
# 10 epochs in batches of 8 (50 steps, ~2 s) score 1.0 on the 26 test images in all 30 runs measured
# (folders of seeds 0, 2, 3 × Teacher seeds 0–9); with the labels shuffled, 0.00–0.73 (the classes differ
# in colour, so a few matching labels teach something). A bound of 0.85 (23 of 26) lies between.
TEACHER_LEARNS = ("teacher.batch_size=8", "teacher.epochs=10")
TEACHER_MIN_ACCURACY = 0.85


def test_rgb_image_folder_end_to_end_reads_the_folder_once(tmp_path):
    folder = make_rgb_folder(tmp_path / "my_images", per_class=35)
    root = tmp_path / "run"
    out = run_pipeline(root, folder, *TEACHER_LEARNS)
    assert "=== synthset pipeline summary ===" in out
    assert out.count("[prepare] image_folder") == 1  # read once, by the prepare stage, not by any worker
    assert "odd_corrupt.png" in out  # the skipped file is listed
    summary = json.loads(next(root.glob("summary-*.json")).read_text())
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0 and summary["images"] == 12
    # The Teacher learned the folder's classes: images and labels reach it paired as the folder says.
    assert summary["teacher_accuracy"] > TEACHER_MIN_ACCURACY, summary["teacher_accuracy"]

    prepared = next((root / "prepare").iterdir())
    record = json.loads((prepared / "prepared.json").read_text())
    assert record["channels"] == 3 and record["image_shape"] == [32, 32, 3]
    assert record["class_names"] == ["disc", "square", "stripes"] and len(record["skipped"]) == 1
    # Every model reads three channels: the VAE, the Teacher and the Students.
    model = next((root / "foundation").glob("*/model"))
    assert json.loads((model / "vae" / "config.json").read_text())["in_channels"] == 3
    for stage in ("teacher", "student-soft", "student-hard"):
        meta = json.loads(next((root / stage).glob("*/classifier.json")).read_text())
        assert meta["in_channels"] == 3, stage
    # The synthetic images are RGB at 32 px.
    from synthset.data.shards import iter_shard

    shard = next((root / "synthesis").glob("*/data/shard-000000.tar"))
    image = next(iter_shard(str(shard)))["image"]
    assert image.shape == (32, 32, 3)

    # Later stages read the prepared shards, never the folder: with the folder gone, a config that changes
    # only the Students reruns them.
    shutil.rmtree(folder)
    out2 = run_pipeline(root, folder, *TEACHER_LEARNS, "student.epochs=2")
    assert "[prepare] reusing" in out2 and "[prepare] image_folder" not in out2
    assert "[student-soft] training" in out2 and "[teacher] reusing" in out2 and "pretraining" not in out2


def test_production_shaped_rgb_pipeline_loaded_by_path_at_64px(tmp_path):
    """A 3-channel SD-layout pipeline (VAE, UNet2DConditionModel, CLIP text encoder) saved with
    save_pretrained and given as foundation.path: nothing is pretrained, every stage loads it by path."""
    from synthset.config import load_config
    from synthset.models.foundation import build_foundation

    arch = load_config(ROOT / "conf" / "tiny.yaml").foundation.arch.model_copy(
        update={"image_size": 64, "image_channels": 3})
    model = tmp_path / "sd-layout"
    build_foundation(arch, seed=0).save_pretrained(model, safe_serialization=True)
    folder = make_rgb_folder(tmp_path / "my_images", per_class=35, seed=1)
    root = tmp_path / "run"
    out = run_pipeline(root, folder, f"foundation.path={model}", "data.image_size=64", "data.splits.public=0")
    assert "=== synthset pipeline summary ===" in out and "pretraining" not in out
    assert not (root / "foundation").exists() or not list((root / "foundation").rglob("model_index.json"))
    shard = next((root / "label").glob("*/data/shard-000000.tar"))
    from synthset.data.shards import iter_shard

    sample = next(iter_shard(str(shard)))
    assert sample["image"].shape == (64, 64, 3) and sample["soft"].shape == (3,)
    meta = json.loads(next((root / "teacher").glob("*/classifier.json")).read_text())
    assert meta["in_channels"] == 3


def _rgb_synthetic_samples(root, method):
    from synthset.data.shards import iter_shard, read_manifest

    dataset = next(p for p in (root / "synthesis").glob("*/data") if read_manifest(str(p))["method"] == method)
    manifest = read_manifest(str(dataset))
    return [s for e in manifest["shards"] for s in iter_shard(str(dataset / e["shard"]))]


def test_casd_trains_its_own_rgb_generator_on_an_image_folder(tmp_path):
    """CASD (source-labelled pixel EDM model) on a user's RGB folder: a ClassPrompt pool generated first,
    the generator trained on 30 private images and the pool, RGB images sampled at source 0."""
    folder = make_rgb_folder(tmp_path / "my_images", per_class=35, seed=2)
    root = tmp_path / "run"
    out = run_pipeline(root, folder, "synthesis.method=casd", "synthesis.num_inference_steps=2",
                       "synthesis.guidance_scale=1.0", "synthesis.casd.real_images=30",
                       "synthesis.casd.pool.method=class_prompt", "synthesis.casd.pool.images_per_class=2",
                       "synthesis.casd.pool.num_inference_steps=2", "synthesis.casd.model.channels=[8,16]",
                       "synthesis.casd.model.attention_levels=[1]", "synthesis.casd.train.steps=3",
                       "synthesis.casd.train.batch_size=4", "synthesis.casd.train.cpus_per_worker=1",
                       "student.labels=[soft]", "evaluate.enabled=false", "replication.enabled=false")
    assert "=== synthset pipeline summary ===" in out
    generator = next((root / "generator").iterdir())
    summary = json.loads((generator / "_SUCCESS.json").read_text())
    assert summary["real_images"] == 30 and summary["pool_images"] == 6  # 3 classes x 2
    net = json.loads((generator / "model" / "config.json").read_text())
    assert net["in_channels"] == 3 and net["num_classes"] == 3 and net["num_sources"] == 2
    samples = _rgb_synthetic_samples(root, "casd")
    assert len(samples) == 12 and all(s["image"].shape == (32, 32, 3) and s["meta"]["source"] == 0 for s in samples)


def test_rcdm_trains_on_an_rgb_image_folder_and_filters_by_embedding(tmp_path):
    """RCDM on a user's RGB folder: the public-split encoder, the embedding-conditioned denoiser on Ray
    Train, RGB samples, and the centroid-band filter keeping the middle half of each class."""
    folder = make_rgb_folder(tmp_path / "my_images", per_class=35, seed=3)
    root = tmp_path / "run"
    out = run_pipeline(root, folder, "synthesis.method=rcdm", "synthesis.images_per_class=8",
                       "synthesis.num_inference_steps=3", "synthesis.batch_size=8", "synthesis.rcdm.sampler=ddim",
                       "synthesis.rcdm.embed.real_images=30", "synthesis.rcdm.embed.public_epochs=1",
                       "synthesis.rcdm.embed.public_width=4", "synthesis.rcdm.model.channels=[8,16]",
                       "synthesis.rcdm.train.steps=4", "synthesis.rcdm.train.batch_size=8",
                       "synthesis.rcdm.train.cpus_per_worker=1", "synthesis.rcdm.filter.enabled=true",
                       "synthesis.rcdm.filter.low=0.25", "synthesis.rcdm.filter.high=0.75",
                       "evaluate.enabled=false", "replication.enabled=false", "student.labels=[hard]")
    assert "=== synthset pipeline summary ===" in out
    samples = _rgb_synthetic_samples(root, "rcdm")
    assert len(samples) == 24 and all(s["image"].shape == (32, 32, 3) for s in samples)
    filtered = json.loads(next((root / "rcdm_filter").glob("*/data/manifest.json")).read_text())
    assert (filtered["filter"]["generated"], filtered["filter"]["kept"]) == (24, 12)
    assert_filter_kept_the_middle_band(root, 0.25, 0.75, size=32, channels=3)  # ranks 2..5 of each class's 8
    summary = json.loads(next(root.glob("summary-*.json")).read_text())
    assert summary["method"] == "rcdm" and 0 <= summary["student_hard_accuracy"] <= 1
