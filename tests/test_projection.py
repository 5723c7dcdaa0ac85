"""The dry run's plan (``projection.py``): counts from the config, FLOP-based GPU-hours, stated assumptions."""

import json

import pytest

from conftest import ROOT
from synthset.config import load_config
from synthset.projection import count_classes, format_projection, generator_kind, project_run


def prod(name: str, *overrides: str):
    return load_config(ROOT / "conf" / "prod" / f"{name}.yaml", ["output.root=/tmp/unused", *overrides])


def test_sd21_figures_match_docs_benchmarks():
    """25 steps × 2 UNet passes × 804.3 GFLOP + 2,514 GFLOP VAE = 42.7 TFLOP; 127 A100-h per 1M at 30 % MFU."""
    p = project_run(prod("class_prompt"))
    assert p["tflop_per_image"] == pytest.approx(42.73, abs=0.01)
    assert p["gpu_hours_per_million_images"] == pytest.approx(126.8, abs=0.1)
    assert p["images"] is None and p["synthesis_gpu_hours"] is None  # /data/train is not here
    assert "30% model-FLOP utilisation (assumed, not measured)" in p["assumption"]


def test_cost_follows_steps_guidance_resolution_and_dtype():
    base = project_run(prod("class_prompt"))["tflop_per_image"]
    assert project_run(prod("class_prompt", "synthesis.guidance_scale=1"))["tflop_per_image"] < base / 1.8
    assert project_run(prod("class_prompt", "synthesis.resolution=768"))["tflop_per_image"] == pytest.approx(
        base * 2.25, rel=1e-3)
    fp32 = project_run(prod("class_prompt", "synthesis.dtype=float32"))
    assert fp32["gpu_hours_per_million_images"] == pytest.approx(2 * 126.8, abs=0.2)


def test_classes_come_from_class_folders_or_are_left_unknown(tmp_path):
    for name in ("cat", "dog", ".hidden"):
        (tmp_path / name).mkdir()
    assert count_classes(prod("loft", f"data.path={tmp_path}", "data.test_path=null"))[0] == 2
    assert count_classes(prod("loft"))[0] is None
    tiny = load_config(ROOT / "conf" / "tiny.yaml")
    assert count_classes(tiny) == (10, "data.source=fashion_mnist")
    p = project_run(tiny)
    assert (p["images"], p["shards"]) == (60, 3) and "synthesis_cpu_hours" in p
    assert "images:      60 (6 per class)" in format_projection(p)


def test_generator_kind_reads_only_the_unet_config(tmp_path):
    sd = tmp_path / "sd" / "unet"
    sd.mkdir(parents=True)
    (sd / "config.json").write_text(json.dumps({"block_out_channels": [320, 640, 1280, 1280]}))
    small = tmp_path / "small" / "unet"
    small.mkdir(parents=True)
    (small / "config.json").write_text(json.dumps({"block_out_channels": [16, 32]}))
    kind = lambda path: generator_kind(prod("class_prompt", f"foundation.path={path}"))[0]
    assert kind(tmp_path / "sd") == "sd2" and kind(tmp_path / "small") == "embedded"
    assert kind("stabilityai/stable-diffusion-2-1-base") == "sd2"
    assert kind("runs/quickstart/foundation/abc/model") == "unknown"
    assert "no projection" in project_run(prod("class_prompt", "foundation.path=runs/x/y/model"))["assumption"]


@pytest.mark.parametrize("config", ["casd.yaml", "rcdm.yaml", "prod/casd.yaml"])
def test_a_method_with_its_own_generator_is_not_projected_as_the_foundation(config):
    """CASD and RCDM synthesise with the model their generator stage trains, not the foundation model."""
    cfg = load_config(ROOT / "conf" / config, ["output.root=/tmp/unused"])
    assert generator_kind(cfg)[0] == "own"
    p = project_run(cfg)
    assert "trained by the" in p["generator"] and "synthesis_gpu_hours" not in p and "synthesis_cpu_hours" not in p
    assert p["assumption"].startswith("no projection: the method's own diffusion model")
