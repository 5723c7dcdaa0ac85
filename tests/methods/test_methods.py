"""Request planning of every method: deterministic, prefix-stable, and what each method means."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from synthset.config import FusionConfig
from synthset.methods import PlanContext, plan_loras, plan_requests
from synthset.methods.loft import fusion_weights
from synthset.stages.adapt import select_shots

NAMES = ["a", "b", "c"]
CAPTIONS = {0: [(0, "small dark item"), (3, "large bright item")], 1: [(1, "wide item")], 2: [(2, "tall item")]}
LORAS = {0: [0, 1, 2, 3], 1: [4, 5, 6], 2: [7, 8]}


def context(**fusion):
    return PlanContext(NAMES, captions=CAPTIONS, loras=LORAS, fusion=FusionConfig(**fusion))


@pytest.mark.parametrize("method", ["class_prompt", "caption_prompt", "tckr", "datadream", "loft"])
def test_plans_are_deterministic_and_any_range_equals_the_slice_of_the_whole(method):
    whole = plan_requests(method, 0, 30, 7, context(beta_alpha=10.0))
    assert whole == plan_requests(method, 0, 30, 7, context(beta_alpha=10.0))
    assert plan_requests(method, 11, 23, 7, context(beta_alpha=10.0)) == whole[11:23]
    assert [r["key"] for r in whole] == [f"{i:010d}" for i in range(30)]
    assert [r["class_id"] for r in whole] == [i % 3 for i in range(30)]
    assert whole != plan_requests(method, 0, 30, 8, context(beta_alpha=10.0))  # the run seed matters


def test_caption_prompts_cycle_the_class_captions():
    rows = plan_requests("caption_prompt", 0, 12, 0, context())
    class0 = [r for r in rows if r["class_id"] == 0]
    assert [r["caption"] for r in class0] == ["small dark item", "large bright item"] * 2
    assert class0[1]["prompt"] == "a: large bright item" and class0[1]["real_index"] == 3
    tckr = plan_requests("tckr", 0, 12, 0, context())
    assert [r["prompt"] for r in tckr] == [r["prompt"] for r in rows]
    # TCKR's table lists the one dataset LoRA under every class; each request uses it at weight 1.
    one = PlanContext(NAMES, captions=CAPTIONS, loras={c: [0] for c in range(3)})
    assert all(r["lora_ids"] == [0] and r["lora_weights"] == [1.0] for r in plan_requests("tckr", 0, 12, 0, one))


def test_loft_fuses_two_distinct_loras_of_the_image_class():
    rows = plan_requests("loft", 0, 300, 3, context())
    for r in rows:
        a, b = r["lora_ids"]
        assert a != b and a in LORAS[r["class_id"]] and b in LORAS[r["class_id"]]
        assert r["lora_weights"] == [0.5, 0.5] and r["prompt"] == f"a photo of a {NAMES[r['class_id']]}"
    pairs = {tuple(sorted(r["lora_ids"])) for r in rows if r["class_id"] == 0}
    assert len(pairs) == 6  # all C(4, 2) pairs of class 0 occur


def test_loft_beta_lambda_is_planned_per_image_and_follows_beta():
    rows = plan_requests("loft", 0, 3000, 0, context(beta_alpha=10.0))
    lam = np.array([r["lora_weights"][0] for r in rows])
    assert np.allclose([sum(r["lora_weights"]) for r in rows], 1.0)
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.std() - np.sqrt(0.25 / 21)) < 0.01  # Beta(10, 10)
    single = plan_requests("loft", 0, 30, 0, context(mode="single"))
    assert all(len(r["lora_ids"]) == 1 and r["lora_weights"] == [1.0] for r in single)
    three = PlanContext(NAMES, loras={0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8]},
                        fusion=FusionConfig(mode="triple", beta_alpha=2.0))
    for r in plan_requests("loft", 0, 30, 0, three):
        assert len(set(r["lora_ids"])) == 3 and set(r["lora_ids"]) <= set(three.loras[r["class_id"]])
        assert abs(sum(r["lora_weights"]) - 1) < 1e-9 and len(set(r["lora_weights"])) == 3


def test_loft_errors_name_the_problem():
    with pytest.raises(ValueError, match="class 'c' has 2 per-image LoRAs"):
        plan_requests("loft", 0, 3, 0, context(mode="triple"))
    with pytest.raises(ValueError, match="unknown mode"):
        fusion_weights("quad", np.random.default_rng(0), 0.5, None)
    with pytest.raises(ValueError, match="unknown method"):
        plan_requests("dreambooth", 0, 3, 0, context())
    with pytest.raises(ValueError, match="no LoRA for class 'a'"):
        plan_requests("datadream", 0, 3, 0, PlanContext(NAMES))


def test_shots_are_k_per_class_seeded_and_loras_follow_the_method():
    labels = np.repeat(np.arange(3), 10)
    shots = select_shots(labels, 3, 4, seed=0)
    assert np.array_equal(np.bincount(labels[shots]), [4, 4, 4])
    assert np.array_equal(shots, select_shots(labels, 3, 4, seed=0))
    assert not np.array_equal(shots, select_shots(labels, 3, 4, seed=1))
    assert len(select_shots(labels, 3, None, 0)) == 30
    with pytest.raises(ValueError, match="class 1 has only 2"):
        select_shots(np.array([0, 0, 0, 1, 1, 2, 2, 2]), 3, 3, 0)
    owner, k = plan_loras("loft", labels[shots])
    assert k == 12 and np.array_equal(owner, np.arange(12))
    owner, k = plan_loras("datadream", labels[shots])
    assert k == 3 and np.array_equal(owner, labels[shots])
    owner, k = plan_loras("tckr", labels[shots])
    assert k == 1 and not owner.any()


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_loft_job_adapts_generates_and_resumes_per_bank(tmp_path, tiny_pipeline_dir):
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
           "--set", f"output.root={tmp_path}", "--set", f"foundation.path={tiny_pipeline_dir}",
           "--set", "tracking.enabled=false", "--set", "synthesis.method=loft",
           "--set", "adapt.shots_per_class=2", "--set", "adapt.steps=2", "--set", "adapt.loras_per_bank=8",
           "--set", "synthesis.images_per_class=2", "--set", "synthesis.shard_size=10"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    adapt = next(tmp_path.glob("adapt/*"))
    banks = sorted(adapt.glob("banks/*.safetensors"))
    assert len(banks) == 3  # 20 per-image LoRAs in banks of 8
    table = json.loads((adapt / "loras.json").read_text())
    assert len(table["loras"]) == 20 and table["rank"] == 2
    data = next(tmp_path.glob("synthesis/*/data"))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["num_samples"] == 20 and manifest["method"] == "loft"
    import tarfile
    with tarfile.open(data / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("0000000004.json").read())
    lora_class = {l["id"]: l["class_id"] for l in table["loras"]}
    assert [lora_class[i] for i in meta["lora_ids"]] == [4, 4] and meta["lora_weights"] == [0.5, 0.5]
    # A lost bank is retrained alone, bit for bit; the rest is reused.
    from synthset.lora.bank import load_bank

    before = load_bank(banks[1])
    banks[1].unlink()
    (adapt / "_SUCCESS.json").unlink()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    assert "2 already trained" in out
    # Same tensors bit for bit (the safetensors header's key order is not stable across processes).
    after = load_bank(banks[1])
    assert before.layers.keys() == after.layers.keys()
    for name, (a, b) in before.layers.items():
        assert torch.equal(a, after.layers[name][0]) and torch.equal(b, after.layers[name][1])
