"""Runs the real jobs/pipeline.py on a user's RGB image folder (odd files included) with a tiny config,
and a production-shaped run: a 3-channel Stable-Diffusion-layout pipeline loaded by path at 64 px."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_prepare import make_rgb_folder

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


def test_rgb_image_folder_end_to_end_reads_the_folder_once(tmp_path):
    folder = make_rgb_folder(tmp_path / "my_images", per_class=35)
    root = tmp_path / "run"
    out = run_pipeline(root, folder)
    assert "=== synthset pipeline summary ===" in out
    assert out.count("[prepare] image_folder") == 1  # read once, by the prepare stage, not by any worker
    assert "odd_corrupt.png" in out  # the skipped file is listed
    summary = json.loads(next(root.glob("summary-*.json")).read_text())
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0 and summary["images"] == 12

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
    out2 = run_pipeline(root, folder, "student.epochs=2")
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
