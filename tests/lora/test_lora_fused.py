"""Per-sample fused LoRA inference (LoFT Eq. 4) against peft's set_adapters, sample by sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close_scaled
from synthset.lora.bank import add_peft_adapter, bank_from_model, inject_lora_bank, routing
from synthset.lora.fused import fused_generate, request_routing
from synthset.diffusion.text_to_image_sampler import generate_batch
from synthset.models.foundation import load_foundation

K, FIRST = 4, 100  # global LoRA ids 100..103
PAIRS = [((100, 101), 0.5), ((102, 100), 0.2), ((103, 102), 0.9), ((101, 103), 0.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir):
    """(pipe with a bank of K random LoRAs, reference pipe holding the same LoRAs as peft adapters)."""
    pipe = load_foundation(str(tiny_pipeline_dir))
    layers = inject_lora_bank(pipe.unet, K, rank=2, first_id=FIRST, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B (a fresh bank is the identity), large enough to change images
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    bank = bank_from_model(pipe.unet)
    ref = load_foundation(str(tiny_pipeline_dir))
    for lora_id in bank.lora_ids:
        add_peft_adapter(ref.unet, bank, lora_id)
    return pipe, ref


def _set_pair(unet, pair, lam):
    unet.set_adapters([f"lora_{pair[0]}", f"lora_{pair[1]}"], [lam, 1 - lam])


def test_each_sample_gets_its_own_pair_and_lambda(pipes):
    pipe, ref = pipes
    unet, c = pipe.unet, pipe.unet.config
    g = torch.Generator().manual_seed(3)
    r = len(PAIRS)
    x = torch.randn(r, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(0, 1000, (r,), generator=g)
    cond = torch.randn(r, 16, c.cross_attention_dim, generator=g)
    ids, weights = request_routing([{"lora_ids": list(p), "lora_weights": [lam, 1 - lam]} for p, lam in PAIRS], K, FIRST)
    with torch.no_grad():
        with routing(unet, ids, weights):
            fused = unet(x, t, encoder_hidden_states=cond).sample
            # Classifier-free guidance: the batch is [uncond; cond], routing applies to both halves.
            x2, t2, cond2 = torch.cat([x, x.flip(0)]), torch.cat([t, t]), torch.cat([cond.flip(0), cond])
            fused_cfg = unet(x2, t2, encoder_hidden_states=cond2).sample
        ref.unet.enable_adapters()
        alone = []
        for i, (pair, lam) in enumerate(PAIRS):
            _set_pair(ref.unet, pair, lam)
            want = ref.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
            # One forward, batched vs alone and fused vs peft: rounding only (seen ≤ 1.6e-6·max|x|);
            # a 1 % error in λ or the LoRA scale is ≥ 1.6e-3·max|x|.
            assert_close_scaled(fused[i:i + 1], want)
            j = r + i
            want2 = ref.unet(x2[j:j + 1], t2[j:j + 1], encoder_hidden_states=cond2[j:j + 1]).sample
            assert_close_scaled(fused_cfg[j:j + 1], want2)
            want1 = ref.unet(x2[i:i + 1], t2[i:i + 1], encoder_hidden_states=cond2[i:i + 1]).sample
            assert_close_scaled(fused_cfg[i:i + 1], want1)
            alone.append(want)
        ref.unet.disable_adapters()
        base = ref.unet(x, t, encoder_hidden_states=cond).sample
    # The LoRAs matter (so the comparison above can fail): every mix moves the output well off the base.
    for i in range(r):
        assert (fused[i] - base[i]).abs().max() > 1e-2


def test_fused_generate_matches_one_image_per_set_adapters_call(pipes):
    pipe, ref = pipes
    requests = [{"key": f"{i:04d}", "seed": 1000 + i, "prompt": p, "lora_ids": list(pair), "lora_weights": [lam, 1 - lam]}
                for i, ((pair, lam), p) in enumerate(zip(PAIRS, ["a photo of a coat", "a photo of a bag",
                                                                 "a photo of a coat", "a photo of a shirt"]))]
    requests.append({"key": "single", "seed": 7, "prompt": "a photo of a bag", "lora_ids": [103], "lora_weights": [1.0]})
    requests.append({"key": "none", "seed": 8, "prompt": "a photo of a bag", "lora_ids": [], "lora_weights": []})
    images = fused_generate(pipe, requests, num_inference_steps=3, guidance_scale=2.0)
    assert images.dtype == np.uint8 and len(images) == len(requests)
    ref.unet.enable_adapters()
    for i, req in enumerate(requests[:len(PAIRS)]):
        _set_pair(ref.unet, req["lora_ids"], req["lora_weights"][0])
        want = generate_batch(ref, [req], num_inference_steps=3, guidance_scale=2.0)[0]
        # ±1 grey level: float32 rounding (~1e-5 relative, ≪ 1/255) can tip a pixel over one uint8 boundary, not two.
        assert np.abs(images[i].astype(int) - want.astype(int)).max() <= 1, req["key"]
    ref.unet.set_adapters(["lora_103"], [1.0])
    want = generate_batch(ref, [requests[-2]], num_inference_steps=3, guidance_scale=2.0)[0]
    assert np.abs(images[-2].astype(int) - want.astype(int)).max() <= 1
    ref.unet.disable_adapters()
    want = generate_batch(ref, [requests[-1]], num_inference_steps=3, guidance_scale=2.0)[0]
    assert np.abs(images[-1].astype(int) - want.astype(int)).max() <= 1
    # Same seed and prompt, different mixes: different images (the LoRAs reach the pixels).
    same = dict(requests[1], lora_ids=[100, 101], lora_weights=[0.5, 0.5])
    other = fused_generate(pipe, [same], num_inference_steps=3, guidance_scale=2.0)[0]
    assert np.abs(other.astype(int) - images[1].astype(int)).mean() > 1.0
    # An image depends only on its own request, not on the batch around it.
    alone = fused_generate(pipe, [requests[2]], num_inference_steps=3, guidance_scale=2.0)[0]
    assert np.abs(alone.astype(int) - images[2].astype(int)).max() <= 1


def test_requests_are_validated(pipes):
    pipe, _ = pipes
    ok = {"key": "k", "seed": 0, "prompt": "a photo of a coat"}
    with pytest.raises(ValueError, match=r"request k: LoRA weight \(λ\) 1.5 outside \[0, 1\]"):
        fused_generate(pipe, [dict(ok, lora_ids=[100, 101], lora_weights=[1.5, -0.5])], 2, 2.0)
    with pytest.raises(ValueError, match="request k: unknown LoRA id 104"):
        fused_generate(pipe, [dict(ok, lora_ids=[100, 104], lora_weights=[0.5, 0.5])], 2, 2.0)
    with pytest.raises(ValueError, match="request k: 2 lora_ids but 1 lora_weights"):
        fused_generate(pipe, [dict(ok, lora_ids=[100, 101], lora_weights=[1.0])], 2, 2.0)
    with pytest.raises(ValueError, match="needs lora_ids and lora_weights"):
        fused_generate(pipe, [ok], 2, 2.0)
    with pytest.raises(ValueError, match="no LoRA bank"):
        fused_generate(load_foundation_without_bank(pipe), [dict(ok, lora_ids=[], lora_weights=[])], 2, 2.0)


def load_foundation_without_bank(pipe):
    import copy

    from synthset.lora.bank import remove_lora_bank

    bare = copy.copy(pipe)
    bare.unet = copy.deepcopy(pipe.unet)
    remove_lora_bank(bare.unet)
    return bare
