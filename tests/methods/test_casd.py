"""CASD as a registry method: config checks, the generator stage's hash and training set per variant, the pool
(a synthset dataset, mismatched or corrupted), generation with the source fixed to 0 recorded per sample, and a
tiny end-to-end run of jobs/pipeline.py that writes shards."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from synthset.config import load_config, stage_hash
from synthset.methods import get_method, method_stages

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["data.source=digits", "data.image_size=8", "foundation.arch.image_size=8", "data.splits.public=0",
          "data.splits.private=200", "tracking.enabled=false", "synthesis.method=casd",
          "synthesis.casd.model.channels=[8,16]", "synthesis.casd.model.attention_levels=[1]"]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(tmp_path, *extra):
    return load_config(None, [f"output.root={tmp_path / 'runs'}", *DIGITS, *extra])


@pytest.fixture
def pool(tmp_path):
    """A synthset dataset of 30 digits-sized images: class c is a flat grey of level 20·(c+1)."""
    from synthset.data.shards import write_manifest, write_shard

    dataset = str(tmp_path / "pool")
    samples = [{"key": f"{i:010d}", "image": np.full((8, 8), 20 * (i % 10 + 1), np.uint8), "cls": i % 10,
                "meta": {"method": "toy"}} for i in range(30)]
    stats = [write_shard(dataset, 0, samples[:20]), write_shard(dataset, 1, samples[20:])]
    write_manifest(dataset, {"class_names": NAMES, "method": "toy"}, stats)
    return dataset


def test_casd_is_registered_with_a_generator_stage_and_hashes_leave_other_methods_alone(tmp_path):
    assert method_stages("casd") == ("generator",) and get_method("casd").generator is not None
    base = {m: stage_hash(load_config(ROOT / "conf" / "tiny.yaml", [f"synthesis.method={m}"]), "synthesis")
            for m in ("class_prompt", "loft")}
    for m in base:  # CASD's settings are not read by the other methods
        other = load_config(ROOT / "conf" / "tiny.yaml", [f"synthesis.method={m}", "synthesis.casd.variant=dm",
                                                           "synthesis.casd.train.steps=7"])
        assert stage_hash(other, "synthesis") == base[m]


def test_config_errors_name_the_field(tmp_path, pool):
    from synthset.pipeline import _check_method

    labels = np.arange(200) % 10
    with pytest.raises(ValueError, match=r"synthesis.casd.pool.path: variant 'casd' trains on a synthetic pool"):
        _check_method(digits(tmp_path), labels, NAMES)
    _check_method(digits(tmp_path, "synthesis.casd.variant=dm"), labels, NAMES)  # DM needs no pool
    with pytest.raises(FileNotFoundError, match="synthesis.casd.pool.path: .*nowhere"):
        _check_method(digits(tmp_path, f"synthesis.casd.pool.path={tmp_path / 'nowhere'}"), labels, NAMES)
    with pytest.raises(ValueError, match="pool.method: 'casd' trains its own generator"):
        digits(tmp_path, "synthesis.casd.pool.method=casd")
    with pytest.raises(ValueError, match="set one of pool.path"):
        digits(tmp_path, f"synthesis.casd.pool.path={pool}", "synthesis.casd.pool.method=class_prompt")
    with pytest.raises(ValueError, match="synthesis.resolution"):
        _check_method(digits(tmp_path, "synthesis.casd.variant=dm", "synthesis.resolution=16"), labels, NAMES)
    with pytest.raises(ValueError, match="synthesis.casd.model.channels.*unknown key|channels"):
        digits(tmp_path, "synthesis.casd.model.channels=[8,12]")  # not a multiple of norm_groups


def test_the_generator_hash_follows_variant_pool_contents_and_not_execution_settings(tmp_path, pool):
    from synthset.stages.generator import generator_dir

    casd = digits(tmp_path, f"synthesis.casd.pool.path={pool}")
    h = generator_dir(casd).hash
    assert generator_dir(digits(tmp_path, f"synthesis.casd.pool.path={pool}",
                                "synthesis.casd.train.checkpoint_every=3")).hash == h
    assert generator_dir(digits(tmp_path, f"synthesis.casd.pool.path={pool}", "synthesis.casd.variant=sda")).hash != h
    # DM reads no pool: its pool settings do not name it.
    assert (generator_dir(digits(tmp_path, "synthesis.casd.variant=dm")).hash
            == generator_dir(digits(tmp_path, "synthesis.casd.variant=dm", f"synthesis.casd.pool.path={pool}")).hash)
    manifest = tmp_path / "pool" / "manifest.json"  # the same path with other contents: another model
    manifest.write_text(manifest.read_text().replace('"toy"', '"toy2"'))
    assert generator_dir(casd).hash != h
    assert generator_dir(casd).uri.endswith(f"/generator/{generator_dir(casd).hash}")


@pytest.mark.parametrize("variant,mismatch", [("casd", "none"), ("sda", "none"), ("dm", "none"),
                                              ("casd", "other_classes"), ("casd", "corrupt")])
def test_training_set_per_variant_and_mismatch(tmp_path, pool, variant, mismatch):
    from synthset.stages.generator import training_set

    cfg = digits(tmp_path, f"synthesis.casd.pool.path={pool}", f"synthesis.casd.variant={variant}",
                 "synthesis.casd.real_images=50", f"synthesis.casd.pool.mismatch={mismatch}")
    data, counts = training_set(cfg, pool if variant != "dm" else None)
    n_pool = 0 if variant == "dm" else 30
    assert counts == {"real_images": 50, "pool_images": n_pool} and len(data.images) == 50 + n_pool
    assert torch.bincount(data.class_labels[:50], minlength=10).tolist() == [5] * 10  # class-balanced subset
    assert data.images.shape[1:] == (1, 8, 8) and data.images.min() >= -1 and data.images.max() <= 1
    if variant == "casd":
        assert data.source.tolist() == [0] * 50 + [1] * 30
    else:
        assert data.source is None
    if n_pool:
        pool_x, pool_y = data.images[50:], data.class_labels[50:]
        true = torch.arange(30) % 10
        assert pool_y.tolist() == (((true + 1) % 10) if mismatch == "other_classes" else true).tolist()
        flat = torch.stack([torch.full((1, 8, 8), 20 * (c + 1) / 127.5 - 1) for c in true.tolist()])
        if mismatch == "corrupt":
            assert (pool_x - flat).abs().mean() > 0.1
        else:
            torch.testing.assert_close(pool_x, flat)


def test_generation_fixes_the_source_to_0_is_seeded_and_records_the_conditioning(tmp_path):
    from synthset.diffusion.pixel_unet import build_pixel_unet
    from synthset.methods import base_context
    from synthset.methods.casd import generate_batch, load_generator, plan_requests

    net = build_pixel_unet({"channels": [8, 16], "layers_per_block": 1, "attention_levels": [1],
                            "attention_head_dim": 8, "norm_groups": 8, "dropout": 0.0}, 8, 1, 10, 2)
    with torch.no_grad():
        net.source_embed.weight.normal_()
        net.class_embed.weight.normal_()
    net.save_pretrained(tmp_path / "model")
    cfg = digits(tmp_path, "synthesis.num_inference_steps=3", "synthesis.guidance_scale=1.0")
    gen = load_generator(str(tmp_path / "model"), None, cfg.synthesis)
    rows = plan_requests(0, 4, 0, base_context(cfg, NAMES))
    assert [r["source"] for r in rows] == [0] * 4 and [r["class_id"] for r in rows] == [0, 1, 2, 3]
    a = generate_batch(gen, [dict(r) for r in rows], cfg.synthesis)
    recorded = [dict(r) for r in rows]
    b = generate_batch(gen, recorded, cfg.synthesis)
    assert a.shape == (4, 8, 8) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert all(r["source"] == 0 and r["variant"] == "casd" and r["sampler"] == "edm_heun" for r in recorded)
    # Source 1 (what CASD never samples) gives other images: the source label is wired through.
    other = generate_batch(gen, [{**r, "source": 1} for r in rows], cfg.synthesis)
    assert not np.array_equal(a, other)
    guided = generate_batch(gen, [dict(r) for r in rows], digits(tmp_path, "synthesis.num_inference_steps=3",
                                                                   "synthesis.guidance_scale=2.0").synthesis)
    assert guided.shape == a.shape and not np.array_equal(a, guided)


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_pipeline_with_casd_writes_shards_with_the_conditioning(tmp_path):
    """jobs/pipeline.py on conf/tiny.yaml with CASD: a ClassPrompt pool generated first, a few generator steps,
    then synthesis, labels and a Student; shards record source 0 per sample."""
    root = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
           "--set", f"output.root={root}", "--set", "synthesis.method=casd",
           "--set", "synthesis.images_per_class=2", "--set", "synthesis.num_inference_steps=2",
           "--set", "synthesis.guidance_scale=1.0",
           "--set", "synthesis.casd.real_images=100", "--set", "synthesis.casd.pool.method=class_prompt",
           "--set", "synthesis.casd.pool.images_per_class=2", "--set", "synthesis.casd.pool.num_inference_steps=2",
           "--set", "synthesis.casd.model.channels=[8,16]", "--set", "synthesis.casd.model.attention_levels=[1]",
           "--set", "synthesis.casd.train.steps=3", "--set", "synthesis.casd.train.batch_size=4",
           "--set", "synthesis.casd.train.checkpoint_every=2", "--set", "synthesis.casd.train.cpus_per_worker=1",
           "--set", "student.labels=[soft]", "--set", "evaluate.enabled=false", "--set", "replication.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    generator = next((root / "generator").iterdir())
    summary = json.loads((generator / "_SUCCESS.json").read_text())
    assert summary["steps"] == 3 and summary["variant"] == "casd" and summary["pool_images"] == 20
    assert (generator / "model" / "config.json").exists() and list((generator / "model").glob("*.safetensors"))
    from synthset.data.shards import iter_shard, read_manifest

    dataset = next(p for p in (root / "synthesis").glob("*/data") if read_manifest(str(p))["method"] == "casd")
    manifest = read_manifest(str(dataset))
    assert manifest["num_samples"] == 20 and manifest["generator"].endswith("model")
    samples = [s for shard in manifest["shards"] for s in iter_shard(str(dataset / shard["shard"]))]
    assert all(s["meta"]["source"] == 0 and s["meta"]["variant"] == "casd" for s in samples)
    assert [s["cls"] for s in samples] == [i % 10 for i in range(20)]
    assert "student_soft_accuracy" in json.loads(next(root.glob("summary-*.json")).read_text())


def test_train_generator_job_rejects_a_method_without_a_generator_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_generator.py"), "--config",
                           str(ROOT / "conf" / "tiny.yaml"), "--set", f"output.root={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "trains no generator of its own (choose casd" in proc.stderr
    assert not (tmp_path / "out").exists()
