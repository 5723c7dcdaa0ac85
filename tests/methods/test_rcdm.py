"""RCDM (seed 002): conditioning, the DDPM loss and its training (deterministic, exact resume) without Ray,
sampling determinism, the centroid-band filter, planning, the generator stage killed on Ray Train and resumed
from its checkpoint, a tiny end-to-end ``jobs/pipeline.py`` run whose manifest records the filter's counts, and
RCDM's stages writing to an object store (moto) what they write to local disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_close_scaled
from synthset.diffusion.generator_training import (TrainingSet, TrainSettings, load_checkpoint, new_state,
                                                   save_checkpoint, step_draws, train_steps)
from synthset.diffusion.rcdm import (DDPM, band_keep, build_denoiser, centroid_distances, class_centroids,
                                     ddpm_loss, ddpm_timesteps, load_denoiser, make_scheduler, sample, save_denoiser,
                                     to_uint8)

ARCH = dict(image_size=8, image_channels=1, channels=[8, 16], layers_per_block=1, norm_groups=4,
            attention_levels=[], embed_dim=6, num_classes=3, num_train_timesteps=100)


def _denoiser(conditioning, seed=0):
    model = build_denoiser({**ARCH, "conditioning": conditioning}, seed=seed).eval()
    with torch.no_grad():  # the shared network starts its condition projections at zero: give them weights
        for name, p in model.named_parameters():
            if "embedding_proj" in name or "class_embed" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("conditioning", ["time", "cross_attention"])
def test_the_embedding_changes_the_prediction(conditioning, one_thread):
    model = _denoiser(conditioning)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50, 50])
    e1, e2 = torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():
        a, b = model(x, t, e1, None), model(x, t, e2, None)
        again = model(x, t, e1, torch.tensor([0, 1]))  # labels are not read when conditioned on embeddings
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    torch.testing.assert_close(a, again)


def test_the_class_baseline_reads_labels_not_embeddings(one_thread):
    model = _denoiser("class")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        a = model(x, t, torch.randn(2, 6), torch.tensor([0, 1]))
        same = model(x, t, torch.randn(2, 6), torch.tensor([0, 1]))
        other = model(x, t, None, torch.tensor([2, 2]))
    torch.testing.assert_close(a, same)
    assert (a - other).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_per_seed_whatever_the_batch(sampler, one_thread):
    model = _denoiser("time")
    emb = torch.randn(3, 6)
    batch = sample(model, [11, 22, 33], emb, None, sampler, steps=5)
    alone = sample(model, [22], emb[1:2], None, sampler, steps=5)
    reordered = sample(model, [33, 11], emb[[2, 0]], None, sampler, steps=5)
    assert batch.shape == (3, 1, 8, 8) and batch.abs().max() <= 1
    assert_close_scaled(alone[0], batch[1])
    assert_close_scaled(reordered[0], batch[2])
    assert_close_scaled(reordered[1], batch[0])
    other_seed = sample(model, [23], emb[1:2], None, sampler, steps=5)
    assert (other_seed[0] - batch[1]).abs().max() > 1e-2
    # The same seed with another embedding gives another image: the condition steers the sample.
    other_embedding = sample(model, [22], emb[0:1] * 3, None, sampler, steps=5)
    assert (other_embedding[0] - batch[1]).abs().max() > 1e-3
    u8 = to_uint8(batch)
    assert u8.shape == (3, 8, 8) and u8.dtype == np.uint8


def _training_set(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainingSet(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3, None, 3,
                       torch.randn(n, 6, generator=g))


SETTINGS = TrainSettings(batch_size=8, lr=2e-3, warmup_steps=0, ema_decay=0.9, class_dropout=0.0, seed=1,
                         decay_steps=30)


def test_ddpm_loss_is_the_noise_prediction_error_at_the_given_timesteps_and_noise(one_thread):
    model = _denoiser("time")
    data = _training_set(4)
    t, noise = torch.tensor([0, 10, 50, 99]), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    alpha_bar = make_scheduler("ddpm", 100).alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * data.images + (1 - alpha_bar).sqrt() * noise  # DDPM Eq. 4
    with torch.no_grad():
        got = ddpm_loss(model)(data.images, t, noise, class_labels=data.class_labels, embedding=data.embeddings)
        expected = ((model(noisy, t, data.embeddings, None) - noise) ** 2).flatten(1).mean(1)
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected)
    levels = ddpm_timesteps(model, 1000, torch.Generator().manual_seed(0))
    assert levels.min() >= 0 and levels.max() == 99  # uniform over the model's 100 training timesteps


def _rcdm_steps(stop, resume_at=None, tmp=None, conditioning="time", data=None, seed=SETTINGS.seed):
    arch = {**ARCH, "conditioning": conditioning}
    settings = TrainSettings(**{**SETTINGS.__dict__, "seed": seed})
    state, data = new_state(build_denoiser(arch), settings.lr), data or _training_set()
    if resume_at is not None:
        train_steps(state, data, settings, resume_at, objective=DDPM)
        save_checkpoint(tmp, state)
        state = new_state(build_denoiser(arch, seed=99), settings.lr)  # all weights must come from the checkpoint
        load_checkpoint(tmp, state)
    train_steps(state, data, settings, stop, objective=DDPM)
    return state


@pytest.mark.parametrize("conditioning", ["time", "class"])
def test_rcdm_training_is_seeded_and_a_run_resumed_from_its_checkpoint_equals_an_unbroken_one(
        conditioning, tmp_path, one_thread):
    a, b = _rcdm_steps(5, conditioning=conditioning), _rcdm_steps(5, conditioning=conditioning)
    assert a.losses == b.losses and all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    assert a.losses != _rcdm_steps(5, conditioning=conditioning, seed=2).losses
    resumed = _rcdm_steps(5, resume_at=2, tmp=str(tmp_path), conditioning=conditioning)
    assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                            "state.json"]
    assert json.loads((tmp_path / "state.json").read_text())["network_config"]["conditioning"] == conditioning
    assert resumed.losses == a.losses
    for k, v in a.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
        assert torch.equal(resumed.ema[k], a.ema[k]), k


def test_rcdm_training_reads_the_embeddings_and_draws_timesteps_per_seed_and_step(one_thread):
    data = _training_set()
    # Other embeddings of the same images (not negated ones: from the zero-initialised projection, -e retraces e).
    other = TrainingSet(data.images, data.class_labels, None, 3, data.embeddings.roll(1, 0))
    assert _rcdm_steps(3, data=data).losses[2] != _rcdm_steps(3, data=other).losses[2]
    model = build_denoiser({**ARCH, "conditioning": "time"})
    draw = lambda step: step_draws(1, step, 32, 8, (1, 8, 8), 0.0, lambda b, g: ddpm_timesteps(model, b, g))
    assert torch.equal(draw(4)["level"], draw(4)["level"]) and not torch.equal(draw(4)["level"], draw(5)["level"])
    assert draw(4)["level"].dtype == torch.long and draw(4)["level"].max() < 100


def test_a_training_grid_samples_each_class_from_its_first_training_embeddings(one_thread):
    data = _training_set(12)
    model = _denoiser("time")
    images, labels = DDPM.sample_grid(model, data, "cpu")
    assert images.shape == (12, 8, 8) and images.dtype == np.uint8 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first = sample(model, [12345], data.embeddings[[0]], None, "ddim", 10)  # class 0's first training image
    np.testing.assert_array_equal(images[0], to_uint8(first)[0])


def test_training_lowers_the_loss_and_the_model_round_trips_through_safetensors(tmp_path, one_thread):
    data = _training_set()
    state = new_state(build_denoiser({**ARCH, "conditioning": "time"}), SETTINGS.lr)
    losses = train_steps(state, data, SETTINGS, 30, objective=DDPM)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    ema = build_denoiser({**ARCH, "conditioning": "time"})
    ema.load_state_dict(state.ema_state())
    save_denoiser(ema, tmp_path / "m", {"embeddings": "e.safetensors"})
    loaded, meta = load_denoiser(tmp_path / "m")
    assert meta["embeddings"] == "e.safetensors" and not list((tmp_path / "m").glob("*.bin"))
    emb = data.embeddings
    torch.testing.assert_close(sample(loaded, [5], emb[:1], None, "ddim", 3),
                               sample(ema.eval(), [5], emb[:1], None, "ddim", 3))


@pytest.mark.slow
def test_the_generator_stage_trains_on_ray_train_and_a_killed_run_resumes_from_its_checkpoint(
        tmp_path, monkeypatch, one_thread):
    """``run_rcdm_generator`` on 1 gloo worker, checkpoints every 2 steps; the worker process exits at step 3 (as a
    killed job would); the stage rerun by a new driver continues from step 2 and ends with the weights of an
    unbroken in-process run."""
    import functools
    import types

    import ray
    import ray.train
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    from synthset.config import load_config
    from synthset.diffusion import generator_training
    from synthset.stages import prepare
    from synthset.stages.rcdm import generator_dir, run_rcdm_generator

    cfg = load_config(ROOT / "conf" / "tiny.yaml", [
        f"output.root={tmp_path / 'run'}", "synthesis.method=rcdm",
        "synthesis.rcdm.model.channels=[8,16]", "synthesis.rcdm.model.num_train_timesteps=100",
        "synthesis.rcdm.train.steps=4", "synthesis.rcdm.train.batch_size=8", "synthesis.rcdm.train.checkpoint_every=2",
        "synthesis.rcdm.train.sample_every=2", "synthesis.rcdm.train.cpus_per_worker=1"])
    data = _training_set(12)
    images = torch.randint(0, 256, (12, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    private = types.SimpleNamespace(read=lambda rows, size: images[rows], labels=data.class_labels.numpy())
    monkeypatch.setattr(prepare, "load_splits", lambda c: types.SimpleNamespace(private=private,
                                                                                 class_names=["a", "b", "c"]))
    embeddings = str(tmp_path / "embeddings.safetensors")
    save_file({"embeddings": data.embeddings.numpy(), "labels": data.class_labels.numpy(),
               "position": np.arange(12)}, embeddings)
    embed = {"embeddings": embeddings, "encoder": "public_cnn"}
    env = {"env_vars": {"PYTHONPATH": str(ROOT / "platform"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    ray.shutdown()  # a Ray an earlier test of the session left running is not this test's
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
    killed = functools.partial(generator_training.fit_generator, max_failures=0, crash_at_step=3)
    try:
        with monkeypatch.context() as m, pytest.raises(ray.train.WorkerGroupError):
            m.setattr(generator_training, "fit_generator", killed)
            run_rcdm_generator(cfg, embed)
    finally:
        ray.shutdown()  # the whole cluster goes, as when a job's driver is killed
    stage = generator_dir(cfg)
    assert not stage.is_complete()
    saved = [f for _, _, files in os.walk(stage.path("ray")) for f in files]
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"} <= set(saved)
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".bin")) for f in saved)  # nothing pickled
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
    try:
        summary = run_rcdm_generator(cfg, embed)
    finally:
        ray.shutdown()
    assert (summary["steps"], summary["resumed_from"]) == (4, 2)
    assert sorted(os.listdir(stage.path("grids"))) == ["samples-step0000002.png", "samples-step0000004.png"]
    from synthset.data.splits import to_unit_tensor
    from synthset.stages.rcdm import denoiser_arch, train_settings

    reference = new_state(build_denoiser(denoiser_arch(cfg, 6, 3, 1), seed=0), cfg.synthesis.rcdm.train.lr)
    train_steps(reference, TrainingSet(to_unit_tensor(images), data.class_labels, None, 3, data.embeddings),
                train_settings(cfg), 4, objective=DDPM)
    got = load_file(os.path.join(summary["model"], "model.safetensors"))
    for k, v in reference.ema.items():
        assert torch.equal(got[k], v), k
    loaded, meta = load_denoiser(summary["model"])
    assert meta["embeddings"] == embeddings and loaded.arch["embed_dim"] == 6


def test_the_band_filter_keeps_exactly_the_middle_of_each_class():
    # Class 0: 8 images at distances 0..7 (shuffled); class 1: 4 images, two tied at 1.0.
    d0 = np.array([5.0, 0.0, 7.0, 2.0, 3.0, 6.0, 1.0, 4.0])
    d1 = np.array([1.0, 9.0, 1.0, 0.5])
    distances = np.concatenate([d0[:4], d1[:2], d0[4:], d1[2:]])
    labels = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1])
    keep = band_keep(distances, labels, 0.25, 0.75)
    # Class 0 drops floor(0.25·8) = 2 nearest (0, 1) and 2 farthest (6, 7): keeps 2, 3, 4, 5.
    assert sorted(distances[keep & (labels == 0)].tolist()) == [2.0, 3.0, 4.0, 5.0]
    # Class 1 ranks 0.5 < 1.0 (position 4) < 1.0 (position 10) < 9.0: keeps ranks 1..2, the tied pair.
    assert np.flatnonzero(keep & (labels == 1)).tolist() == [4, 10]
    assert keep.sum() == 6
    # Another band: keep the nearest 3/8 of class 0 (ranks 0, 1, 2) and floor(0.375·4) = 1 of class 1.
    near = band_keep(distances, labels, 0.0, 0.375)
    assert sorted(distances[near & (labels == 0)].tolist()) == [0.0, 1.0, 2.0]
    assert np.flatnonzero(near & (labels == 1)).tolist() == [11]
    assert band_keep(distances, labels, 0.0, 1.0).all()
    with pytest.raises(ValueError, match="low"):
        band_keep(distances, labels, 0.5, 0.5)


def test_centroids_and_distances():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 10.0], [0.0, 30.0]])
    labels = np.array([0, 0, 1, 1])
    cents = class_centroids(emb, labels, 2)
    np.testing.assert_allclose(cents, [[1.0, 0.0], [0.0, 20.0]])
    np.testing.assert_allclose(centroid_distances(emb, labels, cents), [1.0, 1.0, 10.0, 10.0])
    cos = centroid_distances(np.array([[1.0, 1.0], [0.0, 5.0]]), np.array([0, 1]),
                             class_centroids(emb, labels, 2, "cosine"), "cosine")
    np.testing.assert_allclose(cos, [1 - np.sqrt(0.5), 0.0], atol=1e-12)


def test_requests_are_planned_from_seed_and_index_and_cycle_the_real_embeddings():
    from synthset.methods import get_method
    from synthset.methods.rcdm import embedding_rows, plan_requests

    rows = plan_requests(0, 12, 7, num_classes=3)
    assert rows == plan_requests(0, 12, 7, 3) and rows[5:] == plan_requests(5, 12, 7, 3)
    assert [r["class_id"] for r in rows[:4]] == [0, 1, 2, 0] and rows[3]["embedding_slot"] == 1
    assert len({r["seed"] for r in rows}) == 12 and rows[0]["seed"] != plan_requests(0, 1, 8, 3)[0]["seed"]
    generator = {"rows": {0: np.array([4, 9]), 1: np.array([1]), 2: np.array([0, 2, 3])}}
    # Class 0's real images in turn (4, 9, 4, 9), class 2's (0, 2, 3, 0): every turn has new seeds.
    assert [embedding_rows(generator, [r])[0] for r in rows if r["class_id"] == 0] == [4, 9, 4, 9]
    assert [embedding_rows(generator, [r])[0] for r in rows if r["class_id"] == 2] == [0, 2, 3, 0]
    method = get_method("rcdm")
    assert method.needs == ("embeddings", "generator") and method.after_synthesis is not None


def test_config_errors_name_the_field(tmp_path):
    from synthset.config import load_config

    base = ["synthesis.method=rcdm", f"output.root={tmp_path}"]
    for override, field in [("synthesis.rcdm.filter.low=0.8", "synthesis.rcdm.filter"),
                            ("synthesis.rcdm.model.conditioning=tokens", "synthesis.rcdm.model.conditioning"),
                            ("synthesis.rcdm.sampler=euler", "synthesis.rcdm.sampler"),
                            ("synthesis.rcdm.model.channels=[12,16]", "synthesis.rcdm.model"),
                            ("synthesis.rcdm.embed.colour=1", "synthesis.rcdm.embed.colour")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            load_config(ROOT / "conf" / "tiny.yaml", base + [override])


def test_rcdm_settings_stay_out_of_other_methods_hashes(tmp_path):
    from synthset.config import load_config, stage_hash

    a = load_config(ROOT / "conf" / "tiny.yaml")
    b = load_config(ROOT / "conf" / "tiny.yaml", ["synthesis.rcdm.train.steps=7"])
    assert stage_hash(a, "synthesis") == stage_hash(b, "synthesis")
    r = load_config(ROOT / "conf" / "tiny.yaml", ["synthesis.method=rcdm"])
    f = load_config(ROOT / "conf" / "tiny.yaml", ["synthesis.method=rcdm", "synthesis.rcdm.filter.enabled=true"])
    # Filtering happens after synthesis: same shards, another labelled dataset.
    assert stage_hash(r, "synthesis") == stage_hash(f, "synthesis") and stage_hash(r, "label") != stage_hash(f, "label")
    c = load_config(ROOT / "conf" / "tiny.yaml", ["synthesis.method=rcdm", "synthesis.rcdm.model.conditioning=class"])
    assert stage_hash(r, "rcdm_generator") != stage_hash(c, "rcdm_generator")
    assert stage_hash(r, "embed") == stage_hash(c, "embed")


TINY_RCDM = ["synthesis.method=rcdm", "data.splits.public=300", "data.splits.private=200",
             "synthesis.images_per_class=8", "synthesis.num_inference_steps=3", "synthesis.batch_size=16",
             "synthesis.shard_size=32", "synthesis.rcdm.sampler=ddim",
             "synthesis.rcdm.embed.real_images=40", "synthesis.rcdm.embed.public_epochs=1",
             "synthesis.rcdm.embed.public_width=4", "synthesis.rcdm.model.channels=[8,16]",
             "synthesis.rcdm.train.steps=10", "synthesis.rcdm.train.batch_size=16",
             "synthesis.rcdm.train.cpus_per_worker=1",
             "synthesis.rcdm.filter.enabled=true", "synthesis.rcdm.filter.low=0.25", "synthesis.rcdm.filter.high=0.75",
             "evaluate.enabled=false", "replication.enabled=false", "student.labels=[hard]"]


def assert_filter_kept_the_middle_band(root, low: float, high: float, size: int, channels: int) -> None:
    """The rcdm_filter stage under ``root`` kept exactly the images of each class of n whose rank by distance
    to the class centroid (ties by image index) lies in [low·n, high·n) (band_keep's contract; the tests
    choose n with low·n and high·n whole), with every synthesis image's distance recomputed here: the embed
    stage's encoder on the image, Euclidean (the default metric) to the mean of its class's real embeddings."""
    from safetensors.numpy import load_file

    from synthset.data.shards import image_to_tensor, iter_shard, read_manifest
    from synthset.stages.embed import embed_images, encoder_function

    synthesis = next((root / "synthesis").glob("*/data"))
    generated = [s for e in read_manifest(str(synthesis))["shards"] for s in iter_shard(str(synthesis / e["shard"]))]
    label = {int(s["key"]): int(s["cls"]) for s in generated}
    # The distances the stage ranked (distance, class, image index per synthesis shard) ...
    stage = next((root / "rcdm_filter").iterdir())
    table = np.concatenate([np.load(f) for f in sorted((stage / "distances").glob("*.npy"))], axis=1)
    stored = dict(zip(table[2].astype(int).tolist(), table[0].tolist()))
    assert sorted(stored) == sorted(label) and all(label[int(i)] == int(c) for c, i in zip(table[1], table[2]))
    # ... are each image's distance to its own class's centroid.
    embed = json.loads(next((root / "embed").glob("*/_SUCCESS.json")).read_text())
    real = load_file(embed["embeddings"])
    centroid = {c: real["embeddings"][real["labels"] == c].astype(np.float64).mean(0) for c in set(label.values())}
    x = torch.stack([image_to_tensor(s["image"], size, channels) for s in generated])
    emb = embed_images(encoder_function(embed["encoder"]), x).astype(np.float64)
    ref = np.array([np.linalg.norm(e - centroid[int(s["cls"])]) for s, e in zip(generated, emb)])
    # float32 embeddings of the same images in other batches: rounding ~1e-6 of their magnitude.
    scale = float(np.abs(emb).max())
    np.testing.assert_allclose([stored[int(s["key"])] for s in generated], ref, rtol=1e-4, atol=1e-5 * scale)
    # The middle band of each class by those distances, ties by index: the kept set, not just its size.
    expected = set()
    for c in set(label.values()):
        ranked = sorted((stored[k], k) for k in label if label[k] == c)
        n = len(ranked)
        expected |= {k for _, k in ranked[int(low * n):int(high * n)]}
    filtered = next(stage.glob("data"))
    kept = [s for e in read_manifest(str(filtered))["shards"] for s in iter_shard(str(filtered / e["shard"]))]
    assert sorted(int(s["key"]) for s in kept) == sorted(expected), "kept images (left) vs the middle band (right)"
    assert all(s["meta"]["centroid_distance"] == stored[int(s["key"])] for s in kept)


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_pipeline_with_rcdm_writes_filtered_shards_and_counts(tmp_path):
    root = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
           "--set", f"output.root={root}", *[a for o in TINY_RCDM for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # Synthesis wrote all 80 planned images; the filter kept ranks 2..5 of each class's 8.
    synthesis = json.loads(next((root / "synthesis").glob("*/data/manifest.json")).read_text())
    assert synthesis["num_samples"] == 80 and synthesis["method"] == "rcdm"
    filtered_dir = next((root / "rcdm_filter").glob("*/data"))
    filtered = json.loads((filtered_dir / "manifest.json").read_text())
    f = filtered["filter"]
    assert (f["generated"], f["kept"], f["dropped"]) == (80, 40, 40) and filtered["num_samples"] == 40
    assert all(c == {"generated": 8, "kept": 4, "dropped": 4} for c in f["per_class"].values())
    assert filtered["totals_per_class"] == {str(c): 4 for c in range(10)}
    from synthset.data.shards import iter_shard

    samples = [s for e in filtered["shards"] for s in iter_shard(str(filtered_dir / e["shard"]))]
    assert len({s["key"] for s in samples}) == 40
    meta = samples[0]["meta"]
    assert meta["conditioning"] == "time" and "embedding_index" in meta and "centroid_distance" in meta
    # The kept images are the middle of their class by distance, ties by index.
    assert_filter_kept_the_middle_band(root, 0.25, 0.75, size=32, channels=1)
    labelled = json.loads(next((root / "label").glob("*/data/manifest.json")).read_text())
    assert labelled["num_samples"] == 40 and labelled["source"] == str(filtered_dir)
    summary = json.loads(next(root.glob("summary-*.json")).read_text())
    assert summary["method"] == "rcdm" and 0 <= summary["student_hard_accuracy"] <= 1
    # Rerun of RCDM's stages (in-process: no second Ray start): each is reused, the filtered shards untouched.
    from synthset.config import load_config
    from synthset.stages.embed import run_embed
    from synthset.stages.rcdm import run_rcdm_filter, run_rcdm_generator
    from synthset.stages.synthesize import synthesis_dir

    cfg = load_config(ROOT / "conf" / "tiny.yaml", [f"output.root={root}", *TINY_RCDM])
    before = {p: p.stat().st_mtime_ns for p in filtered_dir.glob("*.tar")}
    embed = run_embed(cfg)
    assert embed.get("reused") and run_rcdm_generator(cfg, embed).get("reused")
    again = run_rcdm_filter(cfg, synthesis_dir(cfg).summary(), embed)
    assert again.get("reused") and again["dataset"] == str(filtered_dir) and again["filter"] == f
    assert {p: p.stat().st_mtime_ns for p in filtered_dir.glob("*.tar")} == before
    # Interrupted filter: lose its success marker, one shard and one cached distance file; the rerun
    # recomputes them and writes byte-identical shards with the same counts.
    stage_dir = filtered_dir.parent
    (stage_dir / "_SUCCESS.json").unlink()
    first = filtered["shards"][0]["shard"]
    (filtered_dir / first).unlink()
    (filtered_dir / "_shards" / f"{first}.json").unlink()
    (stage_dir / "distances" / f"{filtered['shards'][-1]['shard']}.npy").unlink()
    resumed = run_rcdm_filter(cfg, synthesis_dir(cfg).summary(), embed)
    assert not resumed.get("reused") and resumed["filter"] == f
    rewritten = json.loads((filtered_dir / "manifest.json").read_text())
    assert [e["sha256"] for e in rewritten["shards"]] == [e["sha256"] for e in filtered["shards"]]


def _rcdm_generation(cfg) -> dict:
    """embed → rcdm_generator → synthesis → rcdm_filter of ``cfg`` through the stage graph's runners
    (``stages.graph.run_generation`` less the foundation model, which RCDM does not read); {stage: summary}."""
    from synthset.methods import get_method
    from synthset.stages.graph import STAGES, plan_artifacts, run_method_stages
    from synthset.stages.prepare import load_splits
    from synthset.stages.synthesize import run_synthesis

    names = load_splits(cfg).class_names
    done = run_method_stages(cfg, None)
    method = get_method("rcdm")
    synthesis = run_synthesis(cfg, done["generator"]["model"], names,
                              context=method.plan_context(cfg, names, plan_artifacts(cfg, done)))
    filtered = STAGES[method.after_synthesis].run(cfg, None, {**done, "synthesis": synthesis}, True, None)
    return {**done, "synthesis": synthesis, "filtered": filtered}


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_rcdm_stages_write_to_an_object_store_what_they_write_to_local_disk(tmp_path, s3_server, monkeypatch):
    """The same tiny RCDM config with a local and an ``s3://`` output.root (moto on loopback): the remote embed
    stage's arrays and encoder, the denoiser's weights, the synthesis shards and the filter's kept images are the
    local run's, every stage is complete, and nothing is written outside output.root or left half-written."""
    import hashlib
    import shutil
    from pathlib import Path

    import ray
    from safetensors.numpy import load

    from synthset.config import load_config
    from synthset.data.shards import iter_shard, read_manifest
    from synthset.models.encoders import read_embeddings
    from synthset.stages.embed import embed_dir
    from synthset.stages.rcdm import generator_dir

    configs = [load_config(ROOT / "conf" / "tiny.yaml", [f"output.root={root}", *TINY_RCDM])
               for root in (tmp_path / "local", "s3://synthset/runs")]
    # The synthesis actors and the filter read the remote model and encoder through storage.materialize's cache
    # (~/.cache/synthset/artifacts/<sha256(uri)[:16]>): none from an earlier run of this test, none left behind.
    cached = [Path("~/.cache/synthset/artifacts").expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16]
              for uri in (generator_dir(configs[1]).path("model"), embed_dir(configs[1]).path("encoder"))]
    env = {"env_vars": {"PYTHONPATH": str(ROOT / "platform"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    ray.shutdown()  # a Ray an earlier test of the session left running has not this test's environment
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
    try:
        for path in cached:
            shutil.rmtree(path, ignore_errors=True)
        local, remote = map(_rcdm_generation, configs)
        assert all((path / ".complete").is_file() for path in cached), "remote artifacts read without materialize"
    finally:
        ray.shutdown()
        for path in cached:
            shutil.rmtree(path, ignore_errors=True)

    def get(uri: str) -> bytes:
        assert uri.startswith("s3://synthset/runs/"), uri
        return s3_server.get_object(Bucket="synthset", Key=uri[len("s3://synthset/"):])["Body"].read()

    def file(path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    # embed: the same arrays, and the public CNN encoder it trained, in the store.
    assert remote["embed"]["embeddings"].startswith("s3://") and remote["embed"]["encoder"].startswith("s3://")
    here, there = read_embeddings(local["embed"]["embeddings"]), load(get(remote["embed"]["embeddings"]))
    assert sorted(here) == sorted(there) == ["embeddings", "index", "labels", "position"]
    assert all(np.array_equal(here[k], there[k]) for k in here)
    assert get(remote["embed"]["encoder"] + "/model.safetensors") == file(
        os.path.join(local["embed"]["encoder"], "model.safetensors"))
    # rcdm_generator: the same EMA weights; its rcdm.json names the remote embeddings.
    model = remote["generator"]["model"]
    assert get(model + "/model.safetensors") == file(os.path.join(local["generator"]["model"], "model.safetensors"))
    assert json.loads(get(model + "/rcdm.json"))["embeddings"] == remote["embed"]["embeddings"]

    # synthesis and rcdm_filter: the same samples in the same shards (RCDM generation is deterministic): image
    # bytes, class and JSON alike, but for the JSON's "generator", the model's path (so the shards' sha256 differ).
    def samples(run: dict, dataset: str) -> list[list[tuple]]:
        out = []
        for entry in read_manifest(dataset)["shards"]:
            if dataset.startswith("s3://"):  # the object is what the manifest says it is
                assert hashlib.sha256(get(f"{dataset}/{entry['shard']}")).hexdigest() == entry["sha256"]
            shard = []
            for s in iter_shard(f"{dataset}/{entry['shard']}", decode=False):
                assert s["meta"].pop("generator") == run["generator"]["model"]
                shard.append((s["key"], s["cls"], hashlib.sha256(s["image"]).hexdigest(), s["meta"]))
            out.append(shard)
        return out

    synthetic = samples(remote, remote["synthesis"]["dataset"])
    assert remote["synthesis"]["dataset"].startswith("s3://synthset/runs/synthesis/")
    assert sum(map(len, synthetic)) == 80 and synthetic == samples(local, local["synthesis"]["dataset"])
    kept = samples(remote, remote["filtered"]["dataset"])
    assert remote["filtered"]["dataset"].startswith("s3://synthset/runs/rcdm_filter/")
    assert sum(map(len, kept)) == remote["filtered"]["filter"]["kept"] == 40
    assert kept == samples(local, local["filtered"]["dataset"])  # the same keys kept, at the same distances
    assert remote["filtered"]["filter"]["per_class"] == local["filtered"]["filter"]["per_class"]
    # Every stage complete in the store; everything below output.root; no temporary names left.
    pages = s3_server.get_paginator("list_objects_v2").paginate(Bucket="synthset")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert all(k.startswith("runs/") for k in keys) and not [k for k in keys if ".tmp-" in k]
    for stage in ("prepare", "embed", "rcdm_generator", "synthesis", "rcdm_filter"):
        assert [k for k in keys if k.startswith(f"runs/{stage}/") and k.endswith("/_SUCCESS.json")], stage
        assert [k for k in keys if k.startswith(f"runs/{stage}/") and k.endswith("/config.yaml")], stage
    generator = model[len("s3://synthset/"):-len("/model")]  # Ray Train's checkpoints under the stage's ray/
    assert {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{generator}/ray/")} >= {"ema.safetensors",
                                                                                          "state.json"}
