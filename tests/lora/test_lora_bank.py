"""LoRA banks (synthset.lora.bank, synthset.lora.train) on the tiny UNet: training, routing, files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import (assert_adam_close, assert_close_scaled, lora_step_gradients, randomize_lora_b as _randomize_b,
                      unet_inputs as _inputs)
from synthset.lora.bank import (LoraBankLinear, add_peft_adapter, bank_from_model, bank_layers, clear_routing,
                                inject_lora_bank, load_bank, load_bank_into, merge_bank_files, merge_banks,
                                remove_lora_bank, routing, save_bank, set_routing)
from synthset.lora.train import train_lora_bank


pytestmark = pytest.mark.usefixtures("one_thread")

# A step's LoRA gradients computed in other batches, chunks or ranks: a forward and a backward pass of
# float32 sums in another order, seen ≤ 4.3e-6 · max|g| apart here. Ten times the one-forward tolerance
# leaves room for other CPUs' kernels; a gradient scale off by 1 % still moves the largest elements by
# 1e-2 · max|g|, ten times this.
GRADIENT_TOLERANCE = dict(rtol=1e-3, scale_atol=1e-4)


@pytest.fixture(scope="module")
def base_unet(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet", use_safetensors=True).eval()


@pytest.fixture(scope="module")
def noise_scheduler(tiny_pipeline_dir):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_pipeline_dir / "scheduler")


def test_bank_training_equals_separate_training(base_unet, noise_scheduler):
    """THE key property: K LoRAs trained in one bank == each trained alone with the same seeds."""
    k_loras, steps = 3, 4
    n_per = [2, 3, 1]
    x, _, cond = _inputs(base_unet, sum(n_per), seed=5)
    owner = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per)])
    kw = dict(steps=steps, batch_per_lora=2, lr=2e-2, seed=7, min_snr_gamma=5.0, max_grad_norm=1e-3,
              progress_every=1e9)

    bank_unet = copy.deepcopy(base_unet)
    inject_lora_bank(bank_unet, k_loras, rank=2, seed=3)
    with lora_step_gradients() as bank_grads:
        losses = train_lora_bank(bank_unet, noise_scheduler, x, cond, owner, num_loras=k_loras, **kw)
    assert len(bank_grads) == steps
    bank = bank_from_model(bank_unet)
    assert losses.shape == (steps, k_loras) and (losses > 0).all()

    for k in range(k_loras):
        solo_unet = copy.deepcopy(base_unet)
        inject_lora_bank(solo_unet, 1, rank=2, seed=3, first_id=k)
        mine = owner == k
        with lora_step_gradients() as solo_grads:
            solo_losses = train_lora_bank(solo_unet, noise_scheduler, x[mine], cond[mine],
                                          torch.zeros(int(mine.sum())), num_loras=1, **kw)
        solo = bank_from_model(solo_unet)
        # Losses are means of positive squared errors (no cancellation): float32 rounding is ~1e-7 relative.
        assert_close_scaled(solo_losses[:, 0], losses[:, k])
        for name, (a, b) in bank.layers.items():
            assert b[k].abs().max() > 0, "training must move B away from its zero init"
        # Batched and solo forwards round differently (CPU GEMMs block by batch size) and Adam turns
        # gradient noise at its ε floor into up-to-±lr steps on a few elements (here ≤ 3 of 3840);
        # a wrong draw or global instead of per-LoRA clipping moves most elements.
        assert_adam_close([solo.layers[name][i][0] for name in bank.layers for i in (0, 1)],
                          [bank.layers[name][i][k] for name in bank.layers for i in (0, 1)],
                          lr=kw["lr"], steps=steps, label=f"LoRA {k}")
        # Clipping to 1e-3 and Adam both hide a uniform gradient scale (a bank loss weighted 1/K on the
        # backward pass only): the first step's unclipped gradients, from equal parameters, show it.
        for i, (solo_g, bank_g) in enumerate(zip(solo_grads[0], bank_grads[0])):
            assert_close_scaled(solo_g[0], bank_g[k], **GRADIENT_TOLERANCE,
                                msg=lambda m: f"LoRA {k}, step-1 gradient {i}: {m}")


def test_chunked_steps_equal_whole_steps(base_unet, noise_scheduler):
    x, _, cond = _inputs(base_unet, 4, seed=2)
    results, first_grads = [], []
    for max_batch in (None, 3):
        unet = copy.deepcopy(base_unet)
        inject_lora_bank(unet, 4, rank=2)
        with lora_step_gradients() as grads:
            train_lora_bank(unet, noise_scheduler, x, cond[:1], torch.arange(4), num_loras=4, steps=2,
                            batch_per_lora=2, lr=1e-2, max_batch_size=max_batch, progress_every=1e9)
        results.append(bank_from_model(unet))
        first_grads.append(grads[0])
    # The accumulated gradient is the whole step's, not a multiple of it (Adam would hide a uniform
    # factor per chunk): the first step's, from equal parameters, agree to float32 rounding.
    for i, (w, c) in enumerate(zip(*first_grads)):
        assert_close_scaled(c, w, **GRADIENT_TOLERANCE, msg=lambda m: f"step-1 gradient {i}: {m}")
    # Chunks accumulate gradients in another order; Adam may turn that into up-to-±lr steps on a
    # few elements (seen ≤ 6 of 15360, up to 2.6e-4 = 0.03·lr), the rest agree to rounding.
    whole, chunked = results
    assert_adam_close([chunked.layers[name][i] for name in whole.layers for i in (0, 1)],
                      [whole.layers[name][i] for name in whole.layers for i in (0, 1)], lr=1e-2, steps=2)


def test_training_rejects_bad_input(base_unet, noise_scheduler):
    x, _, cond = _inputs(base_unet, 3)
    unet = copy.deepcopy(base_unet)
    with pytest.raises(ValueError, match="no LoRA bank"):
        train_lora_bank(unet, noise_scheduler, x, cond, [0, 0, 0], num_loras=1, steps=1)
    inject_lora_bank(unet, 3, rank=2)
    with pytest.raises(ValueError, match=r"LoRAs \[2\] have no training samples"):
        train_lora_bank(unet, noise_scheduler, x, cond, [0, 1, 1], num_loras=3, steps=1)
    with pytest.raises(ValueError, match="0..2"):
        train_lora_bank(unet, noise_scheduler, x, cond, [0, 1, 3], num_loras=3, steps=1)
    with pytest.raises(ValueError, match="bank holds 3"):
        train_lora_bank(unet, noise_scheduler, x, cond, [0, 1, 2], num_loras=4, steps=1)


def test_init_depends_on_lora_id_not_bank_size(base_unet):
    big, small = copy.deepcopy(base_unet), copy.deepcopy(base_unet)
    inject_lora_bank(big, 4, rank=2, seed=9)
    inject_lora_bank(small, 1, rank=2, seed=9, first_id=2)
    for name, layer in bank_layers(big).items():
        other = bank_layers(small)[name]
        assert torch.equal(other.lora_A[0], layer.lora_A[2])
        assert not torch.equal(layer.lora_A[1], layer.lora_A[2])
        assert torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / layer.in_features ** 0.5  # peft's kaiming_uniform_(a=√5)
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound


def test_injection_targets_and_freezing(base_unet):
    unet = copy.deepcopy(base_unet)
    layers = inject_lora_bank(unet, 2, rank=4, alpha=8)
    names = [layer.name for layer in layers]
    assert names and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert layers[0].scale == 2.0
    with pytest.raises(ValueError, match="already has a LoRA bank"):
        inject_lora_bank(unet, 2, rank=4)
    remove_lora_bank(unet)
    assert not bank_layers(unet) and isinstance(unet.get_submodule(names[0]), torch.nn.Linear)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        inject_lora_bank(copy.deepcopy(base_unet), 2, rank=0)
    with pytest.raises(ValueError, match="not nn.Linear"):
        inject_lora_bank(copy.deepcopy(base_unet), 2, rank=2, targets=("to_out",))


def test_zero_weights_or_no_routing_give_the_base_output(base_unet):
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 3, rank=2))
    x, t, cond = _inputs(unet, 2)
    with torch.no_grad():
        base = base_unet(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample, base)
        with routing(unet, [[0, 1], [2, 1]], torch.zeros(2, 2)):
            assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample, base)
        with routing(unet, [[0, 1], [2, 1]], [[0.5, 0.5], [0.0, 0.0]]):
            mixed = unet(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(mixed[1], base[1])  # weight 0 for one sample: exactly its base output
        assert not torch.allclose(mixed[0], base[0])
        assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample, base)  # routing cleared on exit


def test_routing_rejects_bad_input(base_unet):
    unet = copy.deepcopy(base_unet)
    with pytest.raises(ValueError, match="no LoRA bank"):
        set_routing(unet, [[0]], [[1.0]])
    inject_lora_bank(unet, 3, rank=2)
    with pytest.raises(ValueError, match=r"unknown LoRA id\(s\) \[3\]"):
        set_routing(unet, [[0, 3]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_routing(unet, [[0, 1]], [[1.5, -0.5]])
    with pytest.raises(ValueError, match="shape"):
        set_routing(unet, [[0, 1]], [[1.0]])
    set_routing(unet, [[0], [1], [2]], [[1.0], [1.0], [1.0]])
    x, t, cond = _inputs(unet, 4)
    with pytest.raises(ValueError, match="not a multiple of the routing batch 3"):
        unet(x, t, encoder_hidden_states=cond)
    clear_routing(unet)


def test_save_load_round_trip_is_bit_exact(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 3, rank=2, alpha=4, seed=5, first_id=10))
    path = tmp_path / "bank.safetensors"
    save_bank(path, unet, meta={"method": "loft", "class_ids": [0, 0, 1]}, lora_names=["a", "b", "c"])
    bank = load_bank(path)
    assert (bank.rank, bank.alpha, bank.first_id, bank.num_loras, bank.seed) == (2, 4.0, 10, 3, 5)
    assert bank.lora_names == ["a", "b", "c"] and bank.meta == {"method": "loft", "class_ids": [0, 0, 1]}
    assert list(bank.lora_ids) == [10, 11, 12] and bank.targets == ("to_q", "to_k", "to_v", "to_out.0")
    for name, layer in bank_layers(unet).items():
        assert torch.equal(bank.layers[name][0], layer.lora_A) and torch.equal(bank.layers[name][1], layer.lora_B)

    again = tmp_path / "again.safetensors"  # equal banks are equal bytes (stable header order)
    for _ in range(3):
        save_bank(again, unet, meta={"class_ids": [0, 0, 1], "method": "loft"}, lora_names=["a", "b", "c"])
        assert again.read_bytes() == path.read_bytes()

    fresh = copy.deepcopy(base_unet)
    load_bank_into(fresh, path)
    x, t, cond = _inputs(unet, 2)
    with torch.no_grad(), routing(unet, [[0, 2], [1, 0]], [[0.3, 0.7], [1.0, 0.0]]):
        want = unet(x, t, encoder_hidden_states=cond).sample
    with torch.no_grad(), routing(fresh, [[0, 2], [1, 0]], [[0.3, 0.7], [1.0, 0.0]]):
        assert torch.equal(fresh(x, t, encoder_hidden_states=cond).sample, want)

    other = copy.deepcopy(base_unet)
    inject_lora_bank(other, 2, rank=2)
    with pytest.raises(ValueError, match="LoRA bank layer"):
        load_bank_into(other, bank)


def test_missing_or_corrupt_bank_file_names_the_file(base_unet, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_bank(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_bank(garbage)
    unet = copy.deepcopy(base_unet)
    inject_lora_bank(unet, 2, rank=2)
    good = tmp_path / "good.safetensors"
    save_bank(good, unet)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_bank(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors: not a synthset LoRA bank"):
        load_bank(foreign)


def test_merge_banks_trained_by_id_range(base_unet, tmp_path):
    """Banks for ids 0..1 and 2..4 (as parallel workers make them) merge into the bank for 0..4."""
    whole = copy.deepcopy(base_unet)
    inject_lora_bank(whole, 5, rank=2, seed=4)
    paths = []
    for first, k in ((2, 3), (0, 2)):  # out of order on purpose
        part = copy.deepcopy(base_unet)
        inject_lora_bank(part, k, rank=2, seed=4, first_id=first)
        paths.append(tmp_path / f"part{first}.safetensors")
        save_bank(paths[-1], part, meta={"method": "loft"}, lora_names=[f"img{first + i}" for i in range(k)])
    merged = merge_bank_files(paths, tmp_path / "merged.safetensors")
    again = load_bank(tmp_path / "merged.safetensors")
    assert again.first_id == 0 and again.num_loras == 5 and again.meta == {"method": "loft"}
    assert again.lora_names == [f"img{i}" for i in range(5)]
    for name, layer in bank_layers(whole).items():
        assert torch.equal(again.layers[name][0], layer.lora_A)
        assert torch.equal(merged.layers[name][0], layer.lora_A)
    parts = [load_bank(p) for p in paths]
    with pytest.raises(ValueError, match="gap or overlap"):
        merge_banks([parts[0], parts[0]])
    small = copy.deepcopy(base_unet)
    inject_lora_bank(small, 1, rank=4, first_id=5)
    with pytest.raises(ValueError, match="differs in rank"):
        merge_banks([again, bank_from_model(small)])


def test_peft_adapter_from_bank_matches_a_single_lora(base_unet):
    unet = copy.deepcopy(base_unet)
    _randomize_b(inject_lora_bank(unet, 2, rank=2, first_id=3))
    bank = bank_from_model(unet)
    ref = copy.deepcopy(base_unet)
    name = add_peft_adapter(ref, bank, 4)
    assert name == "lora_4"
    with pytest.raises(ValueError, match="unknown LoRA id 5"):
        add_peft_adapter(ref, bank, 5)
    x, t, cond = _inputs(unet, 2)
    with torch.no_grad():
        with routing(unet, [[1], [1]]):
            ours = unet(x, t, encoder_hidden_states=cond).sample
        theirs = ref(x, t, encoder_hidden_states=cond).sample
    assert_close_scaled(ours, theirs)  # one forward, LoRA computed in another order: rounding only
    assert isinstance(next(iter(bank_layers(unet).values())), LoraBankLinear)


def _data_parallel_worker(rank, world, port, unet_dir, out_dir):
    import os

    import torch.distributed as dist
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    unet = UNet2DConditionModel.from_pretrained(f"{unet_dir}/unet", use_safetensors=True).eval()
    scheduler = DDPMScheduler.from_pretrained(f"{unet_dir}/scheduler")
    x, _, cond = _inputs(unet, 6, seed=5)
    inject_lora_bank(unet, 1, rank=4, seed=3)
    with lora_step_gradients() as grads:
        losses = train_lora_bank(unet, scheduler, x, cond, torch.zeros(6), num_loras=1, steps=3, batch_per_lora=4,
                                 lr=2e-2, seed=7, progress_every=1e9, data_parallel=(rank, world))
    if rank == 0:
        save_bank(f"{out_dir}/dp.safetensors", unet)
        np.save(f"{out_dir}/dp_losses.npy", losses)
        torch.save(grads[0], f"{out_dir}/dp_grads.pt")
    dist.destroy_process_group()


def test_data_parallel_training_equals_one_process(base_unet, noise_scheduler, tiny_pipeline_dir, tmp_path):
    """TCKR's single LoRA split across 2 gloo ranks (as in a Ray Train worker group) == one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_data_parallel_worker, args=(2, port, str(tiny_pipeline_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    unet = copy.deepcopy(base_unet)
    x, _, cond = _inputs(unet, 6, seed=5)
    inject_lora_bank(unet, 1, rank=4, seed=3)
    with lora_step_gradients() as grads:
        losses = train_lora_bank(unet, noise_scheduler, x, cond, torch.zeros(6), num_loras=1, steps=3,
                                 batch_per_lora=4, lr=2e-2, seed=7, progress_every=1e9)
    one, dp = bank_from_model(unet), load_bank(tmp_path / "dp.safetensors")
    # The all-reduced gradient is the whole batch's (a sum, not the ranks' mean: Adam would hide the
    # factor 2): the first step's, from equal parameters, agree to float32 rounding.
    for i, (d, o) in enumerate(zip(torch.load(tmp_path / "dp_grads.pt"), grads[0])):
        assert_close_scaled(d, o, **GRADIENT_TOLERANCE, msg=lambda m: f"step-1 gradient {i}: {m}")
    assert_close_scaled(np.load(tmp_path / "dp_losses.npy"), losses)  # positive means: ~1e-7 relative rounding
    # The all-reduce sums the ranks' gradients in another order: Adam outliers on a few elements (seen ≤ 2 of 7680).
    assert_adam_close([dp.layers[name][i] for name in one.layers for i in (0, 1)],
                      [one.layers[name][i] for name in one.layers for i in (0, 1)], lr=2e-2, steps=3)
    moved = sum(float(b.abs().sum()) for _, b in one.layers.values())
    assert moved > 0  # training moved B off zero, so the comparison is not between two zero tensors
