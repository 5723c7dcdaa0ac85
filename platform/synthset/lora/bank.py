"""LoRA banks: K LoRAs on the same frozen layers, routed per sample.

A *bank* replaces each targeted ``nn.Linear`` of a UNet (by default the attention projections
``to_q``, ``to_k``, ``to_v``, ``to_out.0``, as in LoFT) with a ``LoraBankLinear`` that holds K
low-rank adapters as stacked parameters ``A: [K, r, in]`` and ``B: [K, out, r]``, and each
targeted ``nn.Conv2d`` (``TARGET_PRESETS["locon"]``: the ResNet convolutions too, LoCon-style)
with a ``LoraBankConv2d``, whose A is a k×k convolution to r channels (stored flattened,
``[K, r, in·k·k]``) and B a 1×1 convolution back, as peft's conv LoRA. Before a
forward pass, *routing* says which LoRAs each sample uses and with what weight:
``ids: [batch, M]`` and ``weights: [batch, M]``, and the layer computes, for sample b,

    h_b = W x_b + (alpha / r) * Σ_m weights[b, m] * B[ids[b, m]] A[ids[b, m]] x_b

which is Eq. 4 of LoFT (h = W h + λ ΔW_i h + (1 − λ) ΔW_j h) when M = 2 and the weights are
(λ, 1 − λ), a plain LoRA when M = 1 and the weight is 1, and LoFT's 3-way fusion when M = 3.
Every sample of a batch may use a different LoRA mix, so one batched forward trains many LoRAs
at once (``synthset.lora.train``) and one pipeline call generates images from many LoRA pairs
(``synthset.lora.fused``) — where LoFT's released code calls ``set_adapters`` once per image.

Banks are saved as safetensors (``save_bank`` / ``load_bank``): one ``<module>.lora_A`` and
``<module>.lora_B`` tensor per layer and the bank's rank, alpha, LoRA ids and names, target
modules and a user dict in the header metadata. ``merge_banks`` joins banks trained in parallel
over consecutive id ranges; ``add_peft_adapter`` loads one LoRA of a bank into a diffusers UNet
as a peft adapter (the reference implementation that the tests compare against).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import struct
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Named target sets (``adapt.targets``), matched like peft's target_modules (trailing components).
TARGET_PRESETS = {
    # LoFT / DataDream / TCKR as published: the attention projections only.
    "attention": DEFAULT_TARGETS,
    # Every linear layer of the transformer blocks (attention, projections, feed-forward).
    "transformer": DEFAULT_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    # LoCon: also the ResNet blocks' convolutions, their time-embedding projection and the
    # down/up-sampling convolutions: the layers that place and size things in the image.
    "locon": DEFAULT_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"),
}


def resolve_targets(targets) -> tuple[str, ...]:
    """A preset name of ``TARGET_PRESETS`` or an explicit list of module names → module names."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown LoRA target preset {targets!r}: choose one of {sorted(TARGET_PRESETS)} "
                             "or give a list of module names")
        return TARGET_PRESETS[targets]
    return tuple(targets)


FORMAT = "synthset-lora-bank"
FORMAT_VERSION = "1"


def _init_seed(seed: int, module_name: str, lora_id: int) -> int:
    """The seed of LoRA ``lora_id``'s A matrix in ``module_name``: independent of the bank's size."""
    digest = hashlib.sha256(f"synthset-lora-init:{seed}:{module_name}:{lora_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LoraBankLayer(nn.Module):
    """A frozen layer plus K LoRAs, mixed per sample by the routing set on it.

    ``base``: the layer (frozen here). ``num_loras``: K. ``rank``: r ≥ 1. ``alpha``: the
    LoRA alpha (default r, as in LoFT), giving the scale alpha / r of Hu et al. 2021. ``first_id``:
    the global id of the bank's LoRA 0 (banks trained in parallel cover consecutive id ranges);
    routing uses *local* indices 0 … K-1. ``seed`` and ``name`` (the module's path in the UNet)
    make A's init a function of (seed, name, global id) only, so LoRA k starts from the same
    weights in a bank of 1 or of 1000. A follows peft's default (kaiming-uniform with a = √5,
    i.e. U(-1/√fan_in, 1/√fan_in)); B starts at zero, so a fresh bank leaves the model unchanged.
    Subclasses say what ``fan_in``/``fan_out`` are and apply the routed factors in ``forward``.
    """

    base_type: type = nn.Module

    def __init__(self, base: nn.Module, num_loras: int, rank: int, alpha: float | None = None,
                 seed: int = 0, name: str = "", first_id: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, self.base_type):
            raise ValueError(f"{type(self).__name__} wraps nn.{self.base_type.__name__}, got "
                             f"{type(base).__name__} at {name!r}")
        if int(num_loras) < 1:
            raise ValueError(f"num_loras must be >= 1, got {num_loras}")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if int(first_id) < 0:
            raise ValueError(f"first_id must be >= 0, got {first_id}")
        self.base = base.requires_grad_(False)
        self.name, self.seed, self.first_id = name, int(seed), int(first_id)
        self.num_loras, self.rank = int(num_loras), int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / self.rank
        dtype = dtype or base.weight.dtype
        device = base.weight.device
        a = torch.empty(self.num_loras, self.rank, self.fan_in, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.fan_in)  # kaiming_uniform_(a=√5) on a [r, fan_in] weight
        for k in range(self.num_loras):
            g = torch.Generator().manual_seed(_init_seed(self.seed, name, self.first_id + k))
            a[k].uniform_(-bound, bound, generator=g)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.num_loras, self.fan_out, self.rank, device=device, dtype=dtype))
        self.ids: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self._active = False
        self._cache_routed = True
        self._routing_version = 0
        self._cache: tuple | None = None
        self.mix_of_row: torch.Tensor | None = None   # routing row → index of its distinct (ids, weights) mix
        self._groups: tuple | None = None

    @property
    def fan_in(self) -> int:
        raise NotImplementedError

    @property
    def fan_out(self) -> int:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return f"num_loras={self.num_loras}, rank={self.rank}, alpha={self.alpha}, first_id={self.first_id}"

    def set_routing(self, ids: torch.Tensor | None, weights: torch.Tensor | None, active: bool = True,
                    cache: bool = True, mix_of_row: torch.Tensor | None = None) -> None:
        """Route sample b through LoRAs ``ids[b]`` with ``weights[b]`` (validated by ``set_routing``);
        ``mix_of_row[b]`` numbers row b's distinct mix (``set_routing`` computes it once for every layer)."""
        if ids is None:
            self.ids = self.weights = self.mix_of_row = None
        else:
            self.ids = ids.to(self.lora_A.device)
            self.weights = weights.to(self.lora_A.device, self.lora_A.dtype)
            self.mix_of_row = mix_of_row
        self._groups = None
        self._active = active and ids is not None
        self._cache_routed = cache
        self._routing_version += 1
        self._cache = None

    def _routed_factors(self, reps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_w [reps·R, M·r, fan_in], B_w [reps·R, fan_out, M·r]), weight × scale folded into A_w.

        Σ_m w_m B_m A_m x = [B_1 … B_M] [w_1 A_1; …; w_M A_M] x: two batched products for any M.
        ``reps`` tiles the routing over an activation batch ``reps`` times larger: diffusers'
        StableDiffusionPipeline runs classifier-free guidance on torch.cat([uncond, cond]), so
        sample b sits at rows b and R + b and both halves get the same LoRA mix.
        Without autograd (inference) the result is cached until the routing or the parameters
        change (``Tensor._version`` counts in-place updates), so a denoising loop gathers once.
        """
        def compute():
            a, b = self._gather_factors(self.ids, self.weights)
            return (a.repeat(reps, 1, 1), b.repeat(reps, 1, 1)) if reps > 1 else (a, b)

        return self._cached(("rows", reps), compute)

    def _gather_factors(self, ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_w [R, M·r, fan_in], B_w [R, fan_out, M·r]) of routing rows ``ids``/``w`` [R, M], w × scale in A_w."""
        r_batch, m = ids.shape
        a = self.lora_A[ids] * (w * self.scale)[:, :, None, None]            # [R, M, r, fan_in]
        a = a.reshape(r_batch, m * self.rank, self.fan_in)
        b = self.lora_B[ids].permute(0, 2, 1, 3).reshape(r_batch, self.fan_out, m * self.rank)
        return a, b

    def _cached(self, kind: tuple, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute()``'s factors, kept without autograd until the routing or the parameters change
        (``Tensor._version`` counts in-place updates), so a denoising loop gathers once."""
        need_grad = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        key = (kind, self._routing_version, self.lora_A._version, self.lora_B._version)
        if not need_grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        a, b = compute()
        if not need_grad and self._cache_routed:
            self._cache = (key, a, b)
        return a, b

    def _factors_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        r_batch = self.ids.shape[0]
        if n % r_batch:
            raise ValueError(f"{self.name}: activation batch {n} is not a multiple of the routing batch {r_batch}")
        return self._routed_factors(n // r_batch)

    def _mix(self) -> torch.Tensor:
        """For each routing row, the number of its distinct (ids, weights) mix."""
        return self.mix_of_row if self.mix_of_row is not None else mix_index(self.ids, self.weights)

    def _mix_groups(self, n: int) -> list[torch.Tensor] | None:
        """Activation rows grouped by identical LoRA mix, or None when there are more than n/4 mixes."""
        if self._groups is not None and self._groups[0] == n:
            return self._groups[1]
        if n % self.ids.shape[0]:
            raise ValueError(f"{self.name}: activation batch {n} is not a multiple of the routing batch "
                             f"{self.ids.shape[0]}")
        mix = self._mix()
        mixes = int(mix.max()) + 1
        groups = None
        if mixes * 4 <= n:
            mix = mix.to(self.lora_A.device).repeat(n // len(mix))  # CFG: both halves, same mix
            groups = [torch.nonzero(mix == u).flatten() for u in range(mixes)]
        self._groups = (n, groups)
        return groups

    def _mix_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_u [U, M·r, fan_in], B_u [U, fan_out, M·r]) for the U distinct mixes, weight × scale in A_u.

        The few-mixes path applies these to each mix's rows with plain products: gathering factors
        per *sample* (``_routed_factors``) makes autograd scatter-add every sample's copy back into
        the same LoRA, which was half of a TCKR training step on CPU (docs/benchmarks.md).
        Cached like ``_routed_factors``.
        """
        def compute():
            mix = self._mix().to(self.ids.device)
            first = torch.full((int(mix.max()) + 1,), len(mix), dtype=torch.long, device=mix.device).scatter_reduce_(
                0, mix, torch.arange(len(mix), device=mix.device), reduce="amin")  # each mix's first row
            return self._gather_factors(self.ids[first], self.weights[first])

        return self._cached(("mix",), compute)

    @staticmethod
    def _add_groups(out: torch.Tensor, groups: list[torch.Tensor], delta) -> torch.Tensor:
        """out + δ_u(rows of mix u) for every mix u; ``delta(u, rows)`` computes one mix's rows
        (all of them, unindexed, when there is one mix). In place on the base layer's fresh output
        without autograd."""
        if len(groups) == 1:
            d = delta(0, None)
            return out.add_(d.to(out.dtype)) if not torch.is_grad_enabled() else out + d.to(out.dtype)
        parts = torch.cat([delta(u, rows) for u, rows in enumerate(groups)])
        parts = parts[torch.argsort(torch.cat(groups))].to(out.dtype)
        return out.add_(parts) if not torch.is_grad_enabled() else out + parts

    @staticmethod
    def _add(out3: torch.Tensor, p: torch.Tensor, q: torch.Tensor, shape) -> torch.Tensor:
        """out3 + p q (batched) in one kernel; in place on the base layer's fresh output without autograd."""
        if not torch.is_grad_enabled() and out3.dtype == p.dtype:
            return out3.baddbmm_(p, q).reshape(shape)
        return torch.baddbmm(out3.to(p.dtype), p, q).reshape(shape)


class LoraBankLinear(LoraBankLayer):
    """``LoraBankLayer`` on an ``nn.Linear``: h_b = W x_b + Σ_m w_m (alpha/r) B_m A_m x_b. With few
    distinct mixes in a batch, two plain products per mix; otherwise batched per-sample factors."""

    base_type = nn.Linear

    @property
    def fan_in(self) -> int:
        return self.base.in_features

    @property
    def fan_out(self) -> int:
        return self.base.out_features

    # nn.Linear's attributes, for code that inspects attn.to_q.weight / in_features.
    in_features, out_features = fan_in, fan_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self._active:
            return out
        n = x.shape[0]
        groups = self._mix_groups(n)
        if groups is not None:  # few distinct mixes (training TCKR/DataDream, their synthesis): per mix
            a, b = self._mix_factors()
            x = x.to(a.dtype)
            return self._add_groups(out, groups, lambda u, rows: F.linear(
                F.linear(x if rows is None else x[rows], a[u]), b[u]))
        a, b = self._factors_for(n)
        # Eq. 4 of LoFT for every sample at once: h = x A_wᵀ [N, L, M·r], out + h B_wᵀ (transposed
        # views: BLAS reads them as they are).
        h = torch.bmm(x.reshape(n, -1, self.in_features).to(a.dtype), a.transpose(1, 2))
        out3 = out.reshape(n, -1, self.out_features)
        return self._add(out3, h, b.transpose(1, 2), out.shape).to(out.dtype)


class LoraBankConv2d(LoraBankLayer):
    """``LoraBankLayer`` on an ``nn.Conv2d`` (LoCon): A is the base's k×k convolution to r
    channels (same stride, padding, dilation), B a 1×1 convolution to the output channels, as
    peft's conv LoRA. With few distinct mixes in a batch, one plain convolution per mix; otherwise
    the per-sample A_w run as one grouped convolution (a group per sample)."""

    base_type = nn.Conv2d

    def __init__(self, base: nn.Conv2d, *args, **kwargs):
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(f"LoraBankConv2d: only groups=1, zero-padded convolutions "
                             f"(got groups={base.groups}, padding_mode={base.padding_mode!r})")
        super().__init__(base, *args, **kwargs)

    @property
    def fan_in(self) -> int:
        kh, kw = self.base.kernel_size
        return self.base.in_channels * kh * kw

    @property
    def fan_out(self) -> int:
        return self.base.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self._active:
            return out
        n, cin, height, width = x.shape
        x = x.to(self.lora_A.dtype)
        conv = dict(stride=self.base.stride, padding=self.base.padding, dilation=self.base.dilation)
        groups = self._mix_groups(n)
        if groups is not None:  # few distinct mixes (training TCKR/DataDream, their synthesis): per mix
            a, b = self._mix_factors()
            kernels = a.reshape(len(a), -1, cin, *self.base.kernel_size)
            return self._add_groups(out, groups, lambda u, rows: F.conv2d(
                F.conv2d(x if rows is None else x[rows], kernels[u], None, **conv), b[u][:, :, None, None]))
        # (nearly) every sample its own mix: one grouped convolution, a group per sample
        a, b = self._factors_for(n)
        mr = a.shape[1]
        kernel = a.reshape(n * mr, cin, *self.base.kernel_size)
        h = F.conv2d(x.reshape(1, n * cin, height, width), kernel, None, groups=n, **conv)
        out3 = out.reshape(n, self.fan_out, -1)
        return self._add(out3, b, h.reshape(n, mr, -1), out.shape).to(out.dtype)


def mix_index(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """For each routing row, the number of its distinct (ids, weights) mix (0 … mixes − 1)."""
    rows = torch.cat([ids.to(torch.float64), weights.to(torch.float64)], dim=1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def _matches(name: str, targets) -> bool:
    # peft's rule for target_modules given as names: the full name or its trailing components.
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child.isdigit():  # an entry of a ModuleList / Sequential, e.g. to_out.0
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def bank_layers(model: nn.Module) -> dict[str, LoraBankLayer]:
    """The bank's layers of ``model`` by module path (empty when no bank is injected)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraBankLayer)}


def inject_lora_bank(unet: nn.Module, num_loras: int, rank: int, alpha: float | None = None,
                     targets=DEFAULT_TARGETS, seed: int = 0, first_id: int = 0,
                     dtype: torch.dtype | None = None) -> list[LoraBankLayer]:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``unet`` named by ``targets`` with a bank layer.

    ``targets`` are matched like peft's ``target_modules`` (a module's full path or its trailing
    components: ``"to_q"`` matches every ``…attn1.to_q`` and ``…attn2.to_q``), or name a preset
    of ``TARGET_PRESETS`` (``"attention"``, ``"transformer"``, ``"locon"``). Everything else
    in ``unet`` is frozen; only the bank's A and B require gradients. Returns the new layers.
    For a loaded pipeline: ``inject_lora_bank(pipe.unet, …)`` modifies the pipeline in place.
    """
    if bank_layers(unet):
        raise ValueError("inject_lora_bank: the model already has a LoRA bank (remove_lora_bank first)")
    targets = resolve_targets(targets)
    if not targets:
        raise ValueError("inject_lora_bank: targets is empty")
    found = [(name, m) for name, m in unet.named_modules() if name and _matches(name, targets)]
    if not found:
        raise ValueError(f"inject_lora_bank: no module of the model matches targets {list(targets)}")
    wrong = [name for name, m in found if not isinstance(m, (nn.Linear, nn.Conv2d))]
    if wrong:
        raise ValueError(f"inject_lora_bank: targets {list(targets)} match modules that are not nn.Linear "
                         f"or nn.Conv2d: {wrong[:5]}")
    unet.requires_grad_(False)
    layers = []
    for name, module in found:
        kind = LoraBankConv2d if isinstance(module, nn.Conv2d) else LoraBankLinear
        layer = kind(module, num_loras, rank, alpha, seed=seed, name=name, first_id=first_id, dtype=dtype)
        layer.targets = targets
        _replace_module(unet, name, layer)
        layers.append(layer)
    return layers


def remove_lora_bank(unet: nn.Module) -> None:
    """Put the original layers back (the bank's weights are dropped)."""
    for name, layer in bank_layers(unet).items():
        _replace_module(unet, name, layer.base)


@torch.no_grad()
def fold_lora_into_base(unet: nn.Module, lora_id: int, weight: float = 1.0) -> None:
    """Merge one LoRA of the bank into the base weights and remove the bank: W ← W + w (alpha/r) B A.

    For a method whose every request uses the same single LoRA at the same weight (TCKR), the
    folded model computes the same function as routing every sample through that LoRA, at the
    base model's speed (no per-layer LoRA products). A conv LoRA's A is a k×k convolution to r
    channels and B a 1×1 convolution back, so B A reshaped is a k×k kernel of the base's shape.
    ``lora_id`` is global (the bank's ``first_id`` counts).
    """
    layers = _require_layers(unet)
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"fold_lora_into_base: weight {weight} outside [0, 1]")
    k = int(lora_id) - layers[0].first_id
    if not 0 <= k < layers[0].num_loras:
        raise ValueError(f"fold_lora_into_base: unknown LoRA id {lora_id} (the bank holds "
                         f"{layers[0].first_id}..{layers[0].first_id + layers[0].num_loras - 1})")
    for layer in layers:
        base = layer.base
        delta = (layer.lora_B[k].float() @ layer.lora_A[k].float()) * (weight * layer.scale)  # [out, fan_in]
        base.weight.add_(delta.reshape(base.weight.shape).to(base.weight.dtype))
    remove_lora_bank(unet)


def _require_layers(unet: nn.Module) -> list[LoraBankLayer]:
    layers = list(bank_layers(unet).values())
    if not layers:
        raise ValueError("the model has no LoRA bank: call inject_lora_bank or load_bank_into first")
    return layers


def set_routing(unet: nn.Module, ids, weights=None, cache: bool = True) -> None:
    """Route sample b of the next forwards through LoRAs ``ids[b]`` (local, 0 … K-1) with ``weights[b]``.

    ``ids``: ints [batch, M] (or [batch] for M = 1); ``weights``: floats in [0, 1] of the same
    shape (default all 1). The routing batch is the batch of the UNet input, or a divisor of it
    (classifier-free guidance's doubled batch reuses each sample's routing for both halves).
    Weights that are all zero make every layer return exactly its base output. ``cache``: keep
    the gathered factors between forwards at inference (memory: ~2·M·r·(in+out) floats per
    sample per layer); set False to trade speed for memory.
    """
    layers = _require_layers(unet)
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[:, None]
    weights = torch.ones(ids.shape) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() == 1:
        weights = weights[:, None]
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"routing ids must be integers of shape [batch, M], got {tuple(ids.shape)} {ids.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(f"routing weights shape {tuple(weights.shape)} != ids shape {tuple(ids.shape)}")
    k = layers[0].num_loras
    bad = ids[(ids < 0) | (ids >= k)]
    if bad.numel():
        raise ValueError(f"unknown LoRA id(s) {sorted(set(bad.tolist()))[:5]}: the bank holds local ids 0..{k - 1}")
    if not torch.isfinite(weights).all() or ((weights < 0) | (weights > 1)).any():
        raise ValueError(f"routing weights must lie in [0, 1], got min {weights.min().item()} max {weights.max().item()}")
    ref = layers[0].lora_A
    ids, weights = ids.to(ref.device, torch.long), weights.to(ref.device, ref.dtype)  # once, not per layer
    active = bool((weights != 0).any())
    mix_of_row = mix_index(ids, weights)
    for layer in layers:
        layer.set_routing(ids, weights, active=active, cache=cache, mix_of_row=mix_of_row)


def clear_routing(unet: nn.Module) -> None:
    """No routing: every bank layer returns its base output (and drops cached factors)."""
    for layer in bank_layers(unet).values():
        layer.set_routing(None, None)


@contextlib.contextmanager
def routing(unet: nn.Module, ids, weights=None, cache: bool = True):
    """``with routing(unet, ids, weights): unet(...)`` — set_routing, then clear_routing on exit."""
    set_routing(unet, ids, weights, cache=cache)
    try:
        yield
    finally:
        clear_routing(unet)


# ---------------------------------------------------------------------------------------------
# Saving, loading, merging


@dataclass
class LoraBank:
    """A bank's weights off the model: ``layers[name] = (A [K, r, in], B [K, out, r])``."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    first_id: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_names: list[str] | None = None
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_loras(self) -> int:
        return next(iter(self.layers.values()))[0].shape[0]

    @property
    def lora_ids(self) -> range:
        return range(self.first_id, self.first_id + self.num_loras)

    def local_index(self, lora_id: int) -> int:
        """Position in the bank of global LoRA id ``lora_id`` (ValueError if the bank lacks it)."""
        try:
            index = operator.index(lora_id)  # int or numpy integer, not float or str
        except TypeError:
            index = None
        if index is None or isinstance(lora_id, bool) or index not in self.lora_ids:
            raise ValueError(f"unknown LoRA id {lora_id!r}: the bank holds ids {self.first_id}..{self.lora_ids.stop - 1}")
        return index - self.first_id


def bank_from_model(source) -> LoraBank:
    """A ``LoraBank`` holding (detached, CPU) copies of the weights of a model's bank or of its layers."""
    if isinstance(source, LoraBank):
        return source
    if isinstance(source, nn.Module):
        layers = bank_layers(source)
    elif isinstance(source, dict):
        layers = dict(source)
    else:
        layers = {layer.name: layer for layer in source}
    if not layers:
        raise ValueError("no LoRA bank layers to save")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.num_loras, layer.rank, layer.alpha, layer.first_id) != (first.num_loras, first.rank, first.alpha, first.first_id):
            raise ValueError(f"bank layer {name} differs from the others in num_loras/rank/alpha/first_id")
    return LoraBank(
        layers={name: (l.lora_A.detach().cpu().clone(), l.lora_B.detach().cpu().clone()) for name, l in layers.items()},
        rank=first.rank, alpha=first.alpha, first_id=first.first_id,
        targets=tuple(getattr(first, "targets", DEFAULT_TARGETS)), seed=first.seed)


def save_bank(path, source, meta: dict | None = None, lora_names: list[str] | None = None) -> LoraBank:
    """Write a bank to ``path`` (local path or storage URI) as safetensors, atomically.

    ``source``: a model with a bank, a list/dict of bank layers, or a ``LoraBank``.
    ``meta``: JSON-serialisable dict kept in the header (e.g. method, class ids, config hash).
    ``lora_names``: one name per LoRA (e.g. the image key each LoRA was trained on).
    """
    from safetensors.torch import save

    from synthset import storage

    bank = bank_from_model(source)
    names = lora_names if lora_names is not None else bank.lora_names
    if names is not None and len(names) != bank.num_loras:
        raise ValueError(f"save_bank: {len(names)} lora_names for {bank.num_loras} LoRAs")
    tensors = {}
    for name, (a, b) in bank.layers.items():
        tensors[f"{name}.lora_A"] = a.contiguous()
        tensors[f"{name}.lora_B"] = b.contiguous()
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "rank": str(bank.rank), "alpha": repr(float(bank.alpha)),
        "num_loras": str(bank.num_loras), "first_id": str(bank.first_id), "seed": str(bank.seed),
        "targets": json.dumps(list(bank.targets)), "modules": json.dumps(sorted(bank.layers)),
        "lora_names": json.dumps(list(names) if names is not None else None),
        "meta": json.dumps({**bank.meta, **(meta or {})}, sort_keys=True),
    }
    storage.write_bytes(str(path), _canonical_safetensors(save(tensors, metadata=header)))
    bank.lora_names = list(names) if names is not None else None
    bank.meta = json.loads(header["meta"])
    return bank


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header in a fixed order, so equal banks are equal bytes.

    safetensors writes ``__metadata__`` in hash-map order, which changes from call to call; here
    the metadata keys are sorted and tensors listed by offset (the data section is untouched, and
    offsets are relative to it). The header is padded with spaces to 8 bytes, as safetensors does.
    """
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def _header(data: bytes) -> dict:
    # safetensors layout: u64 little-endian header size, then that many bytes of JSON.
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("header size larger than the file")
    return json.loads(data[8:8 + size])


def load_bank(path) -> LoraBank:
    """Read a bank written by ``save_bank``; a missing or unreadable file raises naming ``path``."""
    from safetensors.torch import load

    from synthset import storage

    path = str(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"LoRA bank file not found: {path}")
    data = storage.read_bytes(path)
    try:
        header = _header(data).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types, json/struct theirs
        raise ValueError(f"{path}: not a readable safetensors LoRA bank ({type(e).__name__}: {e})") from e
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a synthset LoRA bank (header format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: LoRA bank version {header.get('version')!r}, expected {FORMAT_VERSION}")
    try:
        rank, num, modules = int(header["rank"]), int(header["num_loras"]), json.loads(header["modules"])
        layers = {m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]) for m in modules}
        bank = LoraBank(layers=layers, rank=rank, alpha=float(header["alpha"]), first_id=int(header["first_id"]),
                        targets=tuple(json.loads(header["targets"])), lora_names=json.loads(header["lora_names"]),
                        seed=int(header["seed"]), meta=json.loads(header["meta"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: LoRA bank header or tensors incomplete ({type(e).__name__}: {e})") from e
    extra = set(tensors) - {f"{m}.lora_{x}" for m in modules for x in "AB"}
    if extra:
        raise ValueError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
    for m, (a, b) in layers.items():
        if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (num, rank) or b.shape[0] != num or b.shape[2] != rank:
            raise ValueError(f"{path}: layer {m} has A {tuple(a.shape)} B {tuple(b.shape)}, "
                             f"expected [{num}, {rank}, in] and [{num}, out, {rank}]")
    return bank


def load_bank_into(unet: nn.Module, bank) -> list[LoraBankLayer]:
    """Copy a bank (``LoraBank`` or path) into ``unet``, injecting the bank's layers if it has none.

    If ``unet`` already has a bank, its modules, K, rank, alpha and first id must match.
    """
    if not isinstance(bank, LoraBank):
        bank = load_bank(bank)
    layers = bank_layers(unet)
    if not layers:
        inject_lora_bank(unet, bank.num_loras, bank.rank, bank.alpha, bank.targets, seed=bank.seed, first_id=bank.first_id)
        layers = bank_layers(unet)
    missing, unexpected = sorted(set(bank.layers) - set(layers)), sorted(set(layers) - set(bank.layers))
    if missing or unexpected:
        raise ValueError(f"LoRA bank does not fit the model: modules missing from the model {missing[:5]}, "
                         f"model modules absent from the bank {unexpected[:5]}")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = bank.layers[name]
            if (layer.lora_A.shape, layer.lora_B.shape) != (a.shape, b.shape) or layer.first_id != bank.first_id \
                    or layer.alpha != bank.alpha:
                raise ValueError(f"LoRA bank layer {name}: A {tuple(a.shape)} B {tuple(b.shape)} first_id {bank.first_id} "
                                 f"alpha {bank.alpha} vs model A {tuple(layer.lora_A.shape)} B {tuple(layer.lora_B.shape)} "
                                 f"first_id {layer.first_id} alpha {layer.alpha}")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.set_routing(None, None)  # drop any cached factors
    return list(layers.values())


def merge_banks(banks: list[LoraBank]) -> LoraBank:
    """One bank over the union of banks covering consecutive id ranges (e.g. 0..15 and 16..31).

    Banks trained in parallel (one Ray worker per id range) must agree on rank, alpha, targets
    and modules; their id ranges, sorted, must tile first_id .. last id without gaps or overlap.
    """
    if not banks:
        raise ValueError("merge_banks: no banks given")
    banks = sorted(banks, key=lambda b: b.first_id)
    ref = banks[0]
    for b in banks[1:]:
        if (b.rank, b.alpha, tuple(b.targets), sorted(b.layers)) != (ref.rank, ref.alpha, tuple(ref.targets), sorted(ref.layers)):
            raise ValueError(f"merge_banks: bank with first_id {b.first_id} differs in rank/alpha/targets/modules "
                             f"from bank with first_id {ref.first_id}")
    for prev, nxt in zip(banks, banks[1:]):
        if nxt.first_id != prev.lora_ids.stop:
            raise ValueError(f"merge_banks: ids {prev.first_id}..{prev.lora_ids.stop - 1} are followed by a bank "
                             f"starting at {nxt.first_id} (gap or overlap)")
    names = None
    if any(b.lora_names is not None for b in banks):
        names = [n for b in banks for n in (b.lora_names or [None] * b.num_loras)]
    layers = {m: (torch.cat([b.layers[m][0] for b in banks]), torch.cat([b.layers[m][1] for b in banks]))
              for m in ref.layers}
    meta = {k: v for k, v in ref.meta.items() if all(b.meta.get(k) == v for b in banks)}
    return LoraBank(layers=layers, rank=ref.rank, alpha=ref.alpha, first_id=ref.first_id, targets=tuple(ref.targets),
                    lora_names=names, seed=ref.seed, meta=meta)


def merge_bank_files(paths: list, out_path) -> LoraBank:
    """``merge_banks`` over files, written to ``out_path``."""
    merged = merge_banks([load_bank(p) for p in paths])
    return save_bank(out_path, merged)


# ---------------------------------------------------------------------------------------------
# Interop with peft / diffusers (the reference implementation)


def bank_lora_to_peft_state_dict(bank: LoraBank, lora_id: int) -> dict[str, torch.Tensor]:
    """LoRA ``lora_id`` (global id) of ``bank`` as a peft state dict (``<module>.lora_A.weight`` …).

    The format of ``peft.get_peft_model_state_dict``: load it with
    ``peft.set_peft_model_state_dict(unet, sd, adapter_name=...)`` after ``unet.add_adapter``.
    """
    k = bank.local_index(lora_id)
    sd = {}
    for name, (a, b) in bank.layers.items():
        sd[f"{name}.lora_A.weight"] = a[k].clone()
        sd[f"{name}.lora_B.weight"] = b[k].clone()
    return sd


def add_peft_adapter(unet: nn.Module, bank: LoraBank, lora_id: int, adapter_name: str | None = None) -> str:
    """Load LoRA ``lora_id`` of ``bank`` into a diffusers UNet (without a bank) as a peft adapter.

    Returns the adapter name (default ``"lora_<id>"``). Mix adapters with
    ``unet.set_adapters([a, b], [λ, 1 - λ])`` — LoFT's fusion as its released code does it.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    if bank_layers(unet):
        raise ValueError("add_peft_adapter: the model has a LoRA bank; use a UNet without one")
    adapter_name = adapter_name or f"lora_{lora_id}"
    sd = bank_lora_to_peft_state_dict(bank, lora_id)
    config = LoraConfig(r=bank.rank, lora_alpha=bank.alpha, target_modules=list(bank.targets),
                        init_lora_weights=False)
    with warnings.catch_warnings():  # peft warns on every adapter after the first
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=adapter_name)
    for key, tensor in sd.items():  # conv LoRAs: the bank's flat [r, in·k·k] / [out, r] as peft's conv weights
        module, _, part = key.rpartition(".lora_")
        target = unet.get_submodule(f"{module}.lora_{part.split('.')[0]}.{adapter_name}").weight
        sd[key] = tensor.reshape(target.shape)
    result = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"add_peft_adapter: peft did not place {sorted(unexpected)[:5]}")
    return adapter_name
