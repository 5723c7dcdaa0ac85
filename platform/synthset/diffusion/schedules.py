"""Learning-rate schedules, EMA warm-up and Min-SNR weights shared by every trainer of the platform.

diffusers has each of these, but not with these numbers, and the embedded foundation model, every LoRA and
every generator (so every shard of every ``conf/`` config) was trained with these: swapping would change
every output for no gain. What differs, measured against diffusers 0.3x's code:

- ``cosine_with_warmup`` warms up from lr/warmup at step 0; ``get_cosine_schedule_with_warmup`` from 0.
- ``ema_decay_at`` gives update n the decay (1+n)/(10+n); ``EMAModel`` gives n/(9+n) (and 0 at the first
  update), and updates by ``sub_`` where the trainers here ``lerp_``.
- ``min_snr_weights`` takes SNR = ᾱ/(1−ᾱ) directly; ``compute_snr`` squares the ratio of square roots, equal
  up to float rounding, which is enough to move a LoRA's weights in their low bits.
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Multiplier of step ``step`` (0-based): linear warm-up (step+1)/warmup, then a half cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def lr_at(step: int, lr: float, warmup_steps: int, decay_steps: int | None = None) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant, or with
    ``decay_steps`` times ½(1 + cos(π·min(step, decay_steps)/decay_steps)) (cosine to zero)."""
    rate = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
    if decay_steps:
        rate *= 0.5 * (1 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
    return rate


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay of update ``step``: min(decay, (1 + step)/(10 + step)), so early weights fade fast."""
    return min(decay, (1 + step) / (10 + step))


def min_snr_weights(noise_scheduler, t, gamma: float):
    """Per-sample loss weights min(SNR, γ)/SNR for ε-prediction (Min-SNR-γ, Hang et al. 2023, Eq. 6), on ``t``'s device."""
    import torch

    alpha_bar = noise_scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr
