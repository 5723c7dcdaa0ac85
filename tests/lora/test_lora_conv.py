"""LoCon banks: LoRAs on the UNet's convolutions (synthset.lora.bank.LoraBankConv2d), routed per sample."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_scaled, randomize_lora_b as _randomize_b, unet_inputs as _inputs

from synthset.lora.bank import (TARGET_PRESETS, LoraBankConv2d, LoraBankLinear, add_peft_adapter, bank_from_model,
                                bank_layers, fold_lora_into_base, inject_lora_bank, load_bank, load_bank_into,
                                resolve_targets, routing, save_bank)
from synthset.lora.train import train_lora_bank

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_unet(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet", use_safetensors=True).eval()


def test_locon_targets_wrap_convolutions_and_linears(base_unet):
    unet = copy.deepcopy(base_unet)
    layers = inject_lora_bank(unet, 2, rank=2, targets="locon")
    convs = [layer for layer in layers if isinstance(layer, LoraBankConv2d)]
    linears = [layer for layer in layers if isinstance(layer, LoraBankLinear)]
    assert convs and linears
    assert any(layer.name.endswith("resnets.0.conv1") for layer in convs)
    assert any(".downsamplers.0.conv" in layer.name or ".upsamplers.0.conv" in layer.name for layer in convs)
    assert not any(layer.name in ("conv_in", "conv_out") for layer in convs)  # the latent interface stays frozen
    conv = convs[0]
    kh, kw = conv.base.kernel_size
    assert conv.lora_A.shape == (2, 2, conv.base.in_channels * kh * kw)
    assert conv.lora_B.shape == (2, conv.base.out_channels, 2)
    assert resolve_targets("attention") == TARGET_PRESETS["attention"]
    with pytest.raises(ValueError, match="unknown LoRA target preset 'everything'"):
        resolve_targets("everything")


def test_conv_lora_matches_peft(base_unet):
    """Each LoRA of a LoCon bank, routed alone at weight 1, equals peft's LoRA on the same modules."""
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 2, rank=3, alpha=6.0, targets="locon", first_id=10))
    bank = bank_from_model(unet)
    x, t, cond = _inputs(unet, 2, seed=3)
    for lora_id in (10, 11):
        ref = copy.deepcopy(base_unet)
        add_peft_adapter(ref, bank, lora_id)
        with torch.no_grad():
            with routing(unet, [[lora_id - 10]] * 2):
                ours = unet(x, t, encoder_hidden_states=cond).sample
            theirs = ref(x, t, encoder_hidden_states=cond).sample
            base = base_unet(x, t, encoder_hidden_states=cond).sample
        assert float((theirs - base).abs().max()) > 1e-2  # the LoRA really changes the output
        assert_close_scaled(ours, theirs)


def test_per_sample_mixes_equal_samples_run_alone(base_unet):
    """A batch whose samples use different LoRA pairs and λs == each sample in a batch of its own."""
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 3, rank=2, targets="locon"))
    x, t, cond = _inputs(unet, 3, seed=4)
    ids, weights = [[0, 1], [2, 0], [1, 2]], [[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]]
    with torch.no_grad():
        with routing(unet, ids, weights):
            together = unet(x, t, encoder_hidden_states=cond).sample
        for i in range(3):
            with routing(unet, [ids[i]], [weights[i]]):
                alone = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
            assert_close_scaled(together[i:i + 1], alone)


def test_locon_training_moves_conv_loras_and_reloads(base_unet, tiny_pipeline_dir, tmp_path):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_pipeline_dir / "scheduler")
    unet = copy.deepcopy(base_unet)
    layers = inject_lora_bank(unet, 2, rank=2, targets="locon", seed=5)
    x, _, cond = _inputs(unet, 4, seed=6)
    losses = train_lora_bank(unet, scheduler, x, cond, torch.tensor([0, 0, 1, 1]), num_loras=2, steps=3,
                             batch_per_lora=2, lr=1e-2, seed=1, progress_every=1e9)
    assert losses.shape == (3, 2) and (losses > 0).all()
    conv = next(layer for layer in layers if isinstance(layer, LoraBankConv2d))
    assert float(conv.lora_B.detach().abs().max()) > 0  # B leaves zero: the conv LoRA got gradients
    save_bank(tmp_path / "locon.safetensors", unet)
    bank = load_bank(tmp_path / "locon.safetensors")
    assert set(bank.targets) == set(TARGET_PRESETS["locon"])
    fresh = copy.deepcopy(base_unet)
    load_bank_into(fresh, bank)
    for name, layer in bank_layers(fresh).items():
        assert type(layer) is type(bank_layers(unet)[name])
        assert torch.equal(layer.lora_A, bank_layers(unet)[name].lora_A)
        assert torch.equal(layer.lora_B, bank_layers(unet)[name].lora_B)


def test_few_mixes_path_equals_grouped_path(base_unet):
    """A batch with few distinct mixes (one convolution per mix) == the same samples one by one
    (the grouped convolution), with and without classifier-free guidance's doubled batch."""
    unet = copy.deepcopy(base_unet)
    layers = inject_lora_bank(unet, 2, rank=2, targets="locon")
    _randomize_b(layers)
    x, t, cond = _inputs(unet, 8, seed=8)
    ids, weights = [[0, 1], [1, 0]] * 4, [[0.25, 0.75], [1.0, 0.0]] * 4
    with torch.no_grad():
        with routing(unet, ids, weights):
            together = unet(x, t, encoder_hidden_states=cond).sample
            conv = next(layer for layer in layers if isinstance(layer, LoraBankConv2d))
            assert conv._mix_groups(8) is not None  # this batch took the per-mix path
        with routing(unet, ids[:4], weights[:4]):  # routing for 4, activations for 8: the CFG layout
            doubled = unet(x, t, encoder_hidden_states=cond).sample
        for i in range(8):
            with routing(unet, [ids[i]], [weights[i]]):
                alone = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
            assert_close_scaled(together[i:i + 1], alone)
            with routing(unet, [ids[i % 4]], [weights[i % 4]]):
                alone = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
            assert_close_scaled(doubled[i:i + 1], alone)


def test_per_mix_gradients_equal_per_sample_gradients(base_unet):
    """Training batches with few mixes (TCKR, DataDream: plain products per mix) give every LoRA
    factor the same gradient as routing each sample alone (per-sample factors)."""
    unet = copy.deepcopy(base_unet)
    layers = inject_lora_bank(unet, 2, rank=2, targets="locon", seed=3)
    _randomize_b(layers)
    x, t, cond = _inputs(unet, 8, seed=9)
    ids = [0, 1] * 4

    def gradients(batches):
        for layer in layers:
            layer.lora_A.grad = layer.lora_B.grad = None
        for rows in batches:
            with routing(unet, [ids[i] for i in rows]):
                assert (layers[0]._mix_groups(len(rows)) is not None) == (len(rows) == 8)
                unet(x[rows], t[rows], encoder_hidden_states=cond[rows]).sample.pow(2).sum().backward()
        return [p.grad.clone() for layer in layers for p in (layer.lora_A, layer.lora_B)]

    together, alone = gradients([list(range(8))]), gradients([[i] for i in range(8)])
    assert all(float(g.abs().max()) > 0 for g in alone[1::2])  # every B gets a gradient
    for g, ref in zip(together, alone):
        assert_close_scaled(g, ref)


def test_folded_lora_equals_routed_lora(base_unet):
    """TCKR's synthesis folds its one LoRA into the weights: the same function as routing every sample."""
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 2, rank=3, alpha=6.0, targets="locon", first_id=4))
    x, t, cond = _inputs(unet, 4, seed=5)
    with torch.no_grad():
        with routing(unet, [[1]] * 4, [[0.75]] * 4):
            routed = unet(x, t, encoder_hidden_states=cond).sample
        base = base_unet(x, t, encoder_hidden_states=cond).sample
        with pytest.raises(ValueError, match="unknown LoRA id 3"):
            fold_lora_into_base(unet, 3)
        fold_lora_into_base(unet, 5, 0.75)
        assert not bank_layers(unet)
        folded = unet(x, t, encoder_hidden_states=cond).sample
    assert float((routed - base).abs().max()) > 1e-2  # the LoRA really changes the output
    # Folding sums W + ΔW before the product instead of after: float32 rounding of the same maths.
    assert_close_scaled(folded, routed)
