"""The pixel UNet's conditioning, the EDM training loop (determinism, safetensors checkpoints, exact resume)
without Ray, and a 2-worker Ray Train run that is killed and resumes from its last checkpoint."""

import os
import tempfile

import pytest
import torch

from conftest import ROOT, assert_adam_close
from synthset.diffusion.generator_training import (TrainingSet, TrainSettings, edm_loss_at, fit_generator,
                                                   load_checkpoint, new_state, save_checkpoint, save_training_set,
                                                   step_draws, train_steps)
from synthset.diffusion.pixel_unet import ConditionalPixelUNet, build_pixel_unet

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"channels": [8, 16], "layers_per_block": 1, "attention_levels": [1], "attention_head_dim": 8,
        "norm_groups": 8, "dropout": 0.0}
SETTINGS = TrainSettings(batch_size=6, lr=1e-3, warmup_steps=2, ema_decay=0.9, class_dropout=0.2, seed=1)


def tiny_net(seed=0, sources=2, embedding_dim=0):
    return build_pixel_unet(ARCH, 8, 1, num_classes=3, num_sources=sources, embedding_dim=embedding_dim, seed=seed)


def tiny_data(sources=True):
    g = torch.Generator().manual_seed(0)
    return TrainingSet(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.arange(20) % 3,
                       (torch.arange(20) % 2) if sources else None, num_classes=3)


def randomize(net, seed=3):
    """Non-zero condition tables (they start at zero: an untrained condition adds nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (net.class_embed, net.source_embed, net.embedding_proj):
            if module is not None:
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
    return net


def test_each_condition_changes_the_output_and_a_missing_or_unexpected_one_is_an_error():
    net = randomize(tiny_net(embedding_dim=5)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3])
    base = dict(class_labels=torch.tensor([0, 1]), source=torch.tensor([0, 0]), embedding=torch.ones(2, 5))
    with torch.no_grad():
        ref = net(x, t, **base)
        for name, other in (("class_labels", torch.tensor([2, 2])), ("source", torch.tensor([1, 1])),
                            ("embedding", -torch.ones(2, 5))):
            assert (net(x, t, **{**base, name: other}) - ref).abs().max() > 1e-4, name
        assert torch.equal(net(x, t, **base), ref)
    with pytest.raises(ValueError, match="source is required"):
        net(x, t, class_labels=base["class_labels"], embedding=base["embedding"])
    plain = tiny_net(sources=0)
    with pytest.raises(ValueError, match="got source, but the model was built without it"):
        plain(x, t, class_labels=base["class_labels"], source=base["source"])
    # A fresh network ignores its (zero) conditions until trained.
    fresh = tiny_net().eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, class_labels=torch.tensor([0, 0]), source=torch.tensor([0, 0])),
                           fresh(x, t, class_labels=torch.tensor([2, 1]), source=torch.tensor([1, 1])))


def test_save_pretrained_is_safetensors_and_round_trips(tmp_path):
    net = randomize(tiny_net())
    net.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ConditionalPixelUNet.from_pretrained(tmp_path / "m")
    x, t, y, s = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 2]), torch.tensor([1, 0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y, source=s), net.eval()(x, t, class_labels=y, source=s))


def test_edm_loss_at_equals_edm_loss_with_the_same_draws():
    from synthset.diffusion.edm import EDMDenoiser, edm_loss, sample_training_sigmas

    net = randomize(tiny_net()).eval()
    den, data = EDMDenoiser(net), tiny_data()
    cond = dict(class_labels=data.class_labels[:4], source=data.source[:4])
    with torch.no_grad():
        ref = edm_loss(den, data.images[:4], torch.Generator().manual_seed(7), **cond)
        g = torch.Generator().manual_seed(7)
        sigma = sample_training_sigmas(4, g)
        noise = torch.randn(data.images[:4].shape, generator=g)
        torch.testing.assert_close(edm_loss_at(den, data.images[:4], sigma, noise, **cond), ref)


def run_steps(stop, resume_at=None, seed=SETTINGS.seed, tmp=None):
    state = new_state(tiny_net(), SETTINGS.lr)
    settings = TrainSettings(**{**SETTINGS.__dict__, "seed": seed})
    data = tiny_data()
    if resume_at is not None:
        train_steps(state, data, settings, resume_at)
        save_checkpoint(tmp, state)
        state = new_state(tiny_net(seed=99), SETTINGS.lr)  # other weights: all must come from the checkpoint
        load_checkpoint(tmp, state)
        assert state.step == resume_at
    train_steps(state, data, settings, stop)
    return state


def test_training_is_deterministic_per_seed_and_a_resumed_run_equals_an_unbroken_one(tmp_path):
    a, b, other = run_steps(5), run_steps(5), run_steps(5, seed=2)
    assert a.losses == b.losses and all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    assert a.losses != other.losses
    resumed = run_steps(5, resume_at=2, tmp=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                            "state.json"]
    assert resumed.losses == a.losses  # the checkpoint holds the whole state: bit-for-bit the same run
    for k, v in a.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
        assert torch.equal(resumed.ema[k], a.ema[k]), k
    assert a.ema is not None and any(not torch.equal(a.ema[k], v) for k, v in a.net.state_dict().items())


def test_step_draws_depend_only_on_seed_and_step():
    a = step_draws(1, 7, 20, 6, (1, 8, 8), 0.5)
    b = step_draws(1, 7, 20, 6, (1, 8, 8), 0.5)
    c = step_draws(1, 8, 20, 6, (1, 8, 8), 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["noise"], c["noise"])


@pytest.mark.slow
def test_ray_train_two_workers_killed_mid_run_resume_from_the_last_checkpoint(tmp_path):
    """2 gloo workers, checkpoints every 2 steps; a worker process exits at step 3 (max_failures=0, so the run
    fails as a killed job would); a new driver with the same run name continues from step 2 and ends where a
    single process that never stopped ends (up to the all-reduce's float rounding)."""
    import ray
    import ray.train

    net = tiny_net()
    init = str(tmp_path / "init.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, init)
    data_path = str(tmp_path / "data.safetensors")
    save_training_set(data_path, tiny_data())
    kwargs = dict(network_config=dict(net.config), init_weights=init, training_set=data_path, settings=SETTINGS,
                  steps=6, storage_path=str(tmp_path / "ray"), name="resume-test", workers=2, cpus_per_worker=1,
                  checkpoint_every=2)
    env = {"env_vars": {"PYTHONPATH": str(ROOT / "platform"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    # The dashboard stays on: Ray Train's placement-group cleaner queries the state API.
    ray.shutdown()  # a Ray an earlier test of the session left running (stages reuse one) is not this test's
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
    try:
        with pytest.raises(ray.train.WorkerGroupError):
            fit_generator(**kwargs, max_failures=0, crash_at_step=3)
    finally:
        ray.shutdown()  # the whole cluster goes, as when a job's driver is killed
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=env)
    try:
        result = fit_generator(**kwargs, max_failures=0)
    finally:
        ray.shutdown()
    assert result["step"] == 6 and result["resumed_from"] == 2
    from safetensors.torch import load_file

    reference = run_steps(6)
    got = load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    names = list(reference.net.state_dict())
    assert_adam_close([got[k] for k in names], [reference.net.state_dict()[k] for k in names], lr=SETTINGS.lr,
                      steps=6, label="2 workers, resumed vs 1 process, unbroken")
    assert len(result["losses"]) == 6
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference.losses), rtol=1e-4, atol=1e-5)
