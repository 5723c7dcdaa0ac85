"""Per-sample fused LoRA inference: one pipeline call, a different LoRA mix for every image.

LoFT (Eq. 4) generates with h = W h + λ ΔW_i h + (1 − λ) ΔW_j h for a pair (i, j) of same-class
per-image LoRAs; its released code activates each pair with ``set_adapters`` and makes one image
per call. ``fused_generate`` instead routes each sample of a batch through its own LoRAs and
weights (``synthset.lora.bank``), so a batch mixes any pairs, λs, 3-way fusions, single LoRAs
(DataDream, TCKR) and no LoRA at all, and each image still depends only on its own request:
the initial noise comes from the request's seed exactly as in
``diffusion.text_to_image_sampler.generate_batch``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from synthset.lora.bank import bank_layers, routing
from synthset.diffusion.text_to_image_sampler import generate_batch


def request_routing(requests: list[dict], num_loras: int, first_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, M], weights [N, M]) for requests' ``lora_ids`` (global ids) and ``lora_weights``.

    M is the longest mix in the batch; shorter mixes (and ``lora_ids == []``, the foundation model
    alone) are padded with weight 0. Raises ValueError naming the request for mismatched lengths,
    ids the bank does not hold, or weights outside [0, 1].
    """
    if not requests:
        raise ValueError("fused_generate: no requests")
    mixes = []
    for i, r in enumerate(requests):
        name = r.get("key", i)
        if "lora_ids" not in r or "lora_weights" not in r:
            raise ValueError(f"request {name}: needs lora_ids and lora_weights")
        ids, weights = list(r["lora_ids"]), [float(w) for w in r["lora_weights"]]
        if len(ids) != len(weights):
            raise ValueError(f"request {name}: {len(ids)} lora_ids but {len(weights)} lora_weights")
        for lid in ids:
            if isinstance(lid, bool) or not isinstance(lid, (int, np.integer)) or not first_id <= lid < first_id + num_loras:
                raise ValueError(f"request {name}: unknown LoRA id {lid!r} (the bank holds {first_id}..{first_id + num_loras - 1})")
        for w in weights:
            if not (math.isfinite(w) and 0.0 <= w <= 1.0):
                raise ValueError(f"request {name}: LoRA weight (λ) {w} outside [0, 1]")
        mixes.append(([int(lid) - first_id for lid in ids], weights))
    m = max(1, max(len(ids) for ids, _ in mixes))
    ids = torch.zeros(len(requests), m, dtype=torch.long)
    weights = torch.zeros(len(requests), m)
    for i, (lids, ws) in enumerate(mixes):
        ids[i, :len(lids)] = torch.tensor(lids, dtype=torch.long)
        weights[i, :len(ws)] = torch.tensor(ws)
    return ids, weights


@torch.no_grad()
def fused_generate(pipe, requests: list[dict], num_inference_steps: int, guidance_scale: float,
                   height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) for ``requests``, each with its own LoRA mix; one pipeline call.

    ``pipe.unet`` must hold a bank (``inject_lora_bank`` + ``load_bank_into``). Each request has
    ``seed``, ``prompt``, ``lora_ids`` (global LoRA ids) and ``lora_weights`` (e.g. [λ, 1 − λ]).
    Classifier-free guidance doubles the UNet batch; both halves of a sample use its mix (the
    unconditional branch is the LoRA-adapted model too, as with peft's ``set_adapters``).
    """
    layers = list(bank_layers(pipe.unet).values())
    if not layers:
        raise ValueError("fused_generate: pipe.unet has no LoRA bank (inject_lora_bank / load_bank_into)")
    ids, weights = request_routing(requests, layers[0].num_loras, layers[0].first_id)
    with routing(pipe.unet, ids, weights):
        return generate_batch(pipe, requests, num_inference_steps, guidance_scale, height=height, width=width)
