"""The faithful ``pipeline`` shadow of a LoRA method (stages/shadow_generation.py, stages/privacy.py:
train_shadow_regenerate): re-adapt on exactly the half, re-generate as many images as the target's
set, seeded; the ``auto`` rule; the refusals before any work; and the hashes of configs that do not
adapt. Digits at 8×8 with an untrained tiny foundation model: a shadow takes about a second."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthset.config import load_config, pipeline_generation, stage_hash
from synthset.stages.privacy import candidate_pool
from synthset.stages.shadow_generation import regenerate_synthetic_set
from synthset.stages import adapt as adapt_stage
from synthset.stages import privacy as privacy_stage

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["data.source=digits", "data.image_size=8", "foundation.arch.image_size=8", "data.splits.public=0",
          "data.splits.private=200", "data.splits.holdout=40", "replication.tile=4", "teacher.width=8",
          "teacher.epochs=2", "teacher.batch_size=32", "teacher.augment=false", "student.width=8", "student.epochs=2",
          "ray.num_cpus=2", "tracking.enabled=false", "privacy.num_shadows=4", "privacy.num_candidates=20",
          "privacy.query_shift=0"]
# A few strong LoRA steps, so that what a LoRA learned shows in the generated pixels.
TINY_LORA = ["adapt.shots_per_class=null", "adapt.steps=3", "adapt.lr=0.05", "adapt.batch_per_lora=4", "synthesis.images_per_class=2",
             "synthesis.num_inference_steps=2", "synthesis.batch_size=8"]


@pytest.fixture(scope="module")
def foundation_8px(tmp_path_factory):
    """An untrained tiny foundation pipeline at 8×8 (conf/tiny.yaml's architecture)."""
    from synthset.models.foundation import build_foundation

    arch = load_config(ROOT / "conf" / "tiny.yaml", ["foundation.arch.image_size=8", "data.image_size=8"]).foundation.arch
    path = tmp_path_factory.mktemp("foundation-8px") / "model"
    build_foundation(arch, seed=0).save_pretrained(path, safe_serialization=True)
    return str(path)


def _config(tmp_path, foundation, method: str, *overrides: str):
    return load_config(None, [f"output.root={tmp_path / 'runs'}", *DIGITS, f"foundation.path={foundation}",
                              f"synthesis.method={method}", *TINY_LORA, *overrides])


def _spy(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name``, recording each call's arguments."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_regenerate_shadow_adapts_on_exactly_its_half_and_trains_on_the_targets_cardinality(
        tmp_path, foundation_8px, monkeypatch):
    cfg = _config(tmp_path, foundation_8px, "tckr")
    banks = _spy(monkeypatch, adapt_stage, "train_bank")
    students = _spy(monkeypatch, privacy_stage, "pipeline_shadow_logits")
    images, _, num_private, names = candidate_pool(cfg)
    # A half as run_shadow draws it: private images and holdout candidates (pool indices >= num_private).
    half_a = np.r_[np.arange(0, num_private, 2), np.arange(num_private, num_private + 20, 2)]
    half_b = np.r_[np.arange(1, num_private, 2), np.arange(num_private + 1, num_private + 20, 2)]
    query = np.arange(0, len(images), 12)
    run = lambda half, seed: privacy_stage.train_shadow_regenerate(cfg, cfg.privacy, half, query, 0, seed, labels="soft")
    logits = run(half_a, 5)
    assert logits.shape == (len(query), 1, 10) and np.isfinite(logits).all()
    # TCKR: one LoRA over every image of the half (shots_per_class null), nothing else.
    (model, trained, prompts, *_), = banks
    assert model == foundation_8px
    assert sorted(map(bytes, trained)) == sorted(map(bytes, images[half_a]))
    assert all(p.split(": ", 1)[0] in names for p in prompts)  # "{class}: {caption}"
    # The shadow Student learns as many regenerated images as the target's set, every class equally.
    xs, ys = students[0][6:8]  # pipeline_shadow_logits(teacher, student, T, C, x_half, y_half, x_synth, y_synth, ...)
    assert xs.shape == (cfg.synthesis.images_per_class * len(names), 1, 8, 8) and xs.min() >= -1 and xs.max() <= 1
    assert np.bincount(ys.numpy(), minlength=len(names)).tolist() == [cfg.synthesis.images_per_class] * len(names)
    np.testing.assert_array_equal(run(half_a, 5), logits)  # seeded: the same shadow twice
    assert not np.allclose(run(half_b, 5), logits, atol=1e-4)  # another half: another shadow


def test_regenerated_set_comes_from_loras_adapted_on_the_half(tmp_path, foundation_8px, monkeypatch):
    """DataDream prompts only the class, so the set depends on the half only through the LoRAs; with k
    shots per class, ``select_shots`` chooses them from the half, seeded by the shadow's seed."""
    cfg = _config(tmp_path, foundation_8px, "datadream", "adapt.shots_per_class=3")
    banks = _spy(monkeypatch, adapt_stage, "train_bank")
    images, labels, num_private, names = candidate_pool(cfg)
    half_a, half_b = np.arange(0, num_private, 2), np.arange(1, num_private, 2)
    run = lambda half, seed: regenerate_synthetic_set(cfg, foundation_8px, images[half], labels[half], names, seed, 2)
    xa, ya = run(half_a, 5)
    assert xa.shape == (2 * len(names), 1, 8, 8) and ya.tolist() == list(range(10)) * 2
    (_, trained, prompts, owner, first, num_loras, *_), = banks
    assert (first, num_loras) == (0, 10) and np.bincount(owner).tolist() == [3] * 10  # one LoRA per class
    half_rows = {bytes(im) for im in images[half_a]}
    assert all(bytes(im) in half_rows for im in trained)
    assert prompts == [f"a photo of a {names[c]}" for c in owner]
    xa2, _ = run(half_a, 5)
    assert torch.equal(xa, xa2)
    assert not torch.equal(run(half_b, 5)[0], xa)


def test_auto_regenerates_for_lora_methods_and_relabels_otherwise(tmp_path):
    load = lambda method, choice="auto": load_config(None, [f"synthesis.method={method}",
                                                            f"privacy.pipeline_generation={choice}"])
    assert [pipeline_generation(load(m)) for m in ("tckr", "datadream", "loft")] == ["regenerate"] * 3
    assert [pipeline_generation(load(m)) for m in ("class_prompt", "caption_prompt")] == ["relabel"] * 2
    assert pipeline_generation(load("tckr", "relabel")) == "relabel"
    with pytest.raises(ValueError, match="privacy.pipeline_generation.*synthesis.method='class_prompt'"):
        load("class_prompt", "regenerate")


def _student_targets(cfg) -> dict:
    return {f"student-{l}": {"recipe": cfg.student, "labels": l, "dataset": "unused"} for l in ("soft", "hard")}


def test_lora_methods_get_regenerating_shadow_sets_of_their_own(tmp_path, foundation_8px, monkeypatch):
    from synthset.data import shards

    fake, real = {"config_hash": "abc", "num_samples": 20, "shards": [{"sha256": "00"}]}, shards.read_manifest
    monkeypatch.setattr(shards, "read_manifest", lambda dataset: fake if dataset == "unused" else real(dataset))
    modes = ["privacy.shadow_modes=[pipeline]"]
    auto = _config(tmp_path, foundation_8px, "tckr", *modes)
    relabel = _config(tmp_path, foundation_8px, "tckr", *modes, "privacy.pipeline_generation=relabel")
    (a_soft, _), (r_soft, _) = (privacy_stage.target_shadow_sets(c, _student_targets(c)) for c in (auto, relabel))
    assert a_soft.shadows.mode == "pipeline-regenerate-soft" and a_soft.shadows.trainer.func.__name__ == \
        "train_shadow_regenerate"
    assert r_soft.shadows.mode == "pipeline-soft" and r_soft.shadows.trainer.func.__name__ == "train_shadow_pipeline"
    assert a_soft.shadows.stage.hash != r_soft.shadows.stage.hash
    assert stage_hash(auto, "evaluate") != stage_hash(relabel, "evaluate")
    explicit = _config(tmp_path, foundation_8px, "tckr", *modes, "privacy.pipeline_generation=regenerate")
    assert privacy_stage.target_shadow_sets(explicit, _student_targets(explicit))[0].shadows.stage == a_soft.shadows.stage


def test_regenerate_refuses_without_a_foundation_model_before_any_work(tmp_path):
    targets = lambda c: _student_targets(c)
    unset = load_config(None, [f"output.root={tmp_path / 'runs'}", *DIGITS, "synthesis.method=tckr",
                               "privacy.shadow_modes=[pipeline]"])
    with pytest.raises(ValueError, match="foundation.path is not set"):
        privacy_stage.target_shadow_sets(unset, targets(unset))
    missing = unset.model_copy(update={"foundation": unset.foundation.model_copy(update={"path": str(tmp_path / "no")})})
    with pytest.raises(FileNotFoundError, match="foundation.path"):
        privacy_stage.target_shadow_sets(missing, targets(missing))
    assert not (tmp_path / "runs").exists()


def test_configs_without_adaptation_keep_their_hashes(monkeypatch):
    """conf/privacy.yaml (ClassPrompt) hashed before ``privacy.pipeline_generation`` existed: its evaluation
    and its re-labelling pipeline shadow set keep their names; so does TCKR's set when it re-labels. The
    hashes were recorded with the foundation the config then reused (the quickstart's 1,500-step model), so
    the test pins that path: a new quickstart foundation changes these names by design, not this option."""
    fake = {"config_hash": "abc", "num_samples": 200, "shards": [{"sha256": "00"}]}
    monkeypatch.setattr("synthset.data.shards.read_manifest", lambda dataset: fake)
    then = "foundation.path=runs/quickstart/foundation/f67160ef3fd9/model"
    for choice in ("auto", "relabel"):
        cfg = load_config(ROOT / "conf" / "privacy.yaml", [f"privacy.pipeline_generation={choice}", then])
        assert stage_hash(cfg, "evaluate") == "6c0f7ab9e3f1"
        soft = privacy_stage.target_shadow_sets(cfg, {"s": {"recipe": cfg.student, "labels": "soft", "dataset": "d"}})
        assert [(a.shadows.mode, a.shadows.stage.hash) for a in soft] == [
            ("classifier", "874616e78e2c"), ("pipeline-soft", "9b2bd4f860c9")]
    tckr = load_config(ROOT / "conf" / "privacy.yaml", ["synthesis.method=tckr", "privacy.pipeline_generation=relabel", then])
    soft = privacy_stage.target_shadow_sets(tckr, {"s": {"recipe": tckr.student, "labels": "soft", "dataset": "d"}})
    assert soft[1].shadows.stage.hash == "22fb55e63971"


def test_the_teachers_lira_needs_no_foundation_model(tmp_path):
    """jobs/privacy.py attacks the Teacher ahead of generation: only a Student's regenerating set needs the model."""
    cfg = load_config(None, [f"output.root={tmp_path / 'runs'}", *DIGITS, "synthesis.method=tckr",
                             "privacy.shadow_modes=[classifier,pipeline]"])
    (attack,) = privacy_stage.target_shadow_sets(cfg, {"teacher": {"recipe": cfg.teacher}})
    assert attack.shadows.mode == "classifier"


def test_regenerate_refuses_more_shots_than_a_half_holds(tmp_path, foundation_8px):
    cfg = _config(tmp_path, foundation_8px, "datadream", "adapt.shots_per_class=12", "privacy.shadow_modes=[pipeline]")
    with pytest.raises(ValueError, match=r"adapt.shots_per_class=12: .* shadow \d+'s half has"):
        privacy_stage.target_shadow_sets(cfg, _student_targets(cfg))
