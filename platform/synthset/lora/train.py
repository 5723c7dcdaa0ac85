"""Training every LoRA of a bank at once, exactly as if each were trained alone.

One LoRA over the whole private set (TCKR, rank 4), one per class (DataDream, rank 16) and one
per real image (LoFT, rank 2) differ only in ``lora_of_sample``: which LoRA each training
latent belongs to. ``train_lora_bank`` runs, per step, one batched forward of the frozen UNet
over ``batch_per_lora`` samples of *every* LoRA, each sample routed through its own LoRA, with

    loss = Σ_k mean_{s ∈ batch_k} ℓ_s        (ℓ_s: the ε-prediction MSE of sample s)

A sum, not a mean: LoRA k's parameters only see its own samples, so its gradient is exactly its
solo gradient. Each LoRA draws its samples, noise and timesteps from its own generator, seeded by
(seed, global LoRA id) only; AdamW and the cosine schedule act elementwise (per-LoRA gradient
clipping, never global). Hence training a bank of K equals K separate trainings up to float
rounding, and a bank split across workers by id range (``merge_banks``) equals one big bank.
``bank_loss`` is the per-step loss on its own, for a Ray Train loop to reuse. No Ray here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from synthset.diffusion.schedules import cosine_with_warmup, min_snr_weights
from synthset.lora.bank import LoraBankLayer, bank_layers, routing
from synthset.progress import Progress


def lora_train_seed(seed: int, lora_id: int) -> int:
    """The seed of LoRA ``lora_id``'s training generator (samples, noise, timesteps)."""
    digest = hashlib.sha256(f"synthset-lora-train:{seed}:{lora_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _SampleStream:
    """Positions into one LoRA's samples, by epochs of seeded permutations (any batch size)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.buffer = torch.empty(0, dtype=torch.long)

    def take(self, count: int) -> torch.Tensor:
        while len(self.buffer) < count:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.g)])
        out, self.buffer = self.buffer[:count], self.buffer[count:]
        return out


def bank_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
              lora_ids: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, num_loras: int,
              min_snr_gamma: float | None = None, samples_per_lora: torch.Tensor | int | None = None):
    """Σ_k (1/n_k) Σ_{s: lora_ids[s] = k} ℓ_s for one batch: returns ``(loss, per_lora)``.

    ``latents`` (scaled, N×C×h×w), ``encoder_hidden_states`` (N×T×D), ``lora_ids`` (N, local
    ids), ``noise`` and ``timesteps`` (N) are one step's batch; ``noise_scheduler`` is a training
    scheduler (``DDPMScheduler.from_config(pipe.scheduler.config)``). ℓ_s is the MSE to the
    ε (or v) target, times min(SNR, γ)/SNR when ``min_snr_gamma`` is set (Min-SNR-γ, Eq. 6 of
    Hang et al. 2023). ``n_k`` is ``samples_per_lora`` when the step's batch is split into chunks
    whose gradients are accumulated (then n_k counts LoRA k's samples in the whole step), else the
    count in this batch. ``per_lora`` [K] (detached) holds each LoRA's contribution to ``loss``.
    """
    x_t = noise_scheduler.add_noise(latents, noise, timesteps)
    with routing(unet, lora_ids[:, None], torch.ones(len(lora_ids), 1)):
        pred = unet(x_t, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma).to(per_sample)
    ids = lora_ids.to(per_sample.device)
    if samples_per_lora is None:
        counts = torch.bincount(ids, minlength=num_loras).clamp(min=1).to(per_sample)
    else:
        counts = torch.as_tensor(samples_per_lora, dtype=per_sample.dtype, device=per_sample.device)
    per_sample = per_sample / (counts[ids] if counts.dim() else counts)
    loss = per_sample.sum()
    per_lora = torch.zeros(num_loras, dtype=per_sample.dtype, device=per_sample.device).index_add_(0, ids, per_sample.detach())
    return loss, per_lora


@torch.no_grad()
def clip_grad_norm_per_lora_(layers: list[LoraBankLayer], max_norm: float) -> torch.Tensor:
    """Scale each LoRA's gradient (over all layers) to norm ≤ ``max_norm``; returns the K norms."""
    sq = None
    for layer in layers:
        for p in (layer.lora_A, layer.lora_B):
            if p.grad is not None:
                s = p.grad.float().pow(2).flatten(1).sum(1)
                sq = s if sq is None else sq + s
    if sq is None:
        return torch.zeros(0)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for layer in layers:
        for p in (layer.lora_A, layer.lora_B):
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype)[:, None, None])
    return norms


def train_lora_bank(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    lora_of_sample, num_loras: int, steps: int, batch_per_lora: int = 1, lr: float = 1e-3,
                    seed: int = 0, min_snr_gamma: float | None = None, weight_decay: float = 1e-2,
                    warmup_steps: int = 0, max_grad_norm: float | None = None, max_batch_size: int | None = None,
                    progress_every: float = 10.0, data_parallel: tuple[int, int] | None = None) -> np.ndarray:
    """Train all K LoRAs of the bank injected in ``unet`` for ``steps`` steps; returns losses [steps, K].

    ``latents``: scaled latents (N×C×h×w, ``vae`` posterior means × ``scaling_factor``).
    ``encoder_hidden_states``: N×T×D prompt embeddings, one per latent (a single prompt's T×D or
    1×T×D is broadcast). ``lora_of_sample``: N local LoRA ids in 0 … K-1, every LoRA with ≥ 1
    sample — zeros for TCKR's single LoRA, class ids for DataDream, ``arange(N)`` for LoFT.
    Each step LoRA k draws ``batch_per_lora`` of its samples (epochs of seeded permutations),
    their noise and timesteps from its generator (``lora_train_seed(seed, first_id + k)``),
    so the result equals training LoRA k alone in a bank of 1 with the same ``first_id + k``.
    AdamW (``lr``, ``weight_decay``) with a cosine schedule (``warmup_steps`` linear warm-up);
    ``max_grad_norm`` clips each LoRA's gradient separately; ``max_batch_size`` splits a step's
    K·batch_per_lora samples into chunks whose gradients are accumulated (same result, bounded
    memory). The UNet's train/eval mode is left as it is (SD's UNet has no dropout by default).
    ``data_parallel=(rank, world_size)`` (inside an initialised ``torch.distributed`` group, e.g. a
    Ray Train worker): every rank draws the same step batch, computes the loss of its share
    (positions ``rank::world_size``) and the LoRA gradients are summed across ranks before the
    identical optimiser step — the same result as one process, with the UNet work divided.
    """
    layers = list(bank_layers(unet).values())
    if not layers:
        raise ValueError("train_lora_bank: the UNet has no LoRA bank (inject_lora_bank first)")
    if layers[0].num_loras != num_loras:
        raise ValueError(f"train_lora_bank: num_loras={num_loras} but the bank holds {layers[0].num_loras}")
    if steps < 1 or batch_per_lora < 1:
        raise ValueError(f"train_lora_bank: steps ({steps}) and batch_per_lora ({batch_per_lora}) must be >= 1")
    if not lr > 0:
        raise ValueError(f"train_lora_bank: lr must be > 0, got {lr}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"train_lora_bank: max_batch_size must be >= 1, got {max_batch_size}")
    n = len(latents)
    owner = torch.as_tensor(lora_of_sample, dtype=torch.long).cpu()
    if owner.shape != (n,):
        raise ValueError(f"train_lora_bank: lora_of_sample has shape {tuple(owner.shape)}, expected ({n},)")
    if n and (owner.min() < 0 or owner.max() >= num_loras):
        raise ValueError(f"train_lora_bank: lora_of_sample values must lie in 0..{num_loras - 1}")
    counts = torch.bincount(owner, minlength=num_loras)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"train_lora_bank: LoRAs {empty[:10]} have no training samples")
    cond = encoder_hidden_states
    if cond.dim() == 2:
        cond = cond[None]
    if cond.shape[0] == 1 and n > 1:
        cond = cond.expand(n, *cond.shape[1:])
    if cond.shape[0] != n:
        raise ValueError(f"train_lora_bank: {cond.shape[0]} encoder_hidden_states for {n} latents")

    device = layers[0].lora_A.device
    first_id = layers[0].first_id
    members = [torch.nonzero(owner == k).flatten() for k in range(num_loras)]
    generators = [torch.Generator().manual_seed(lora_train_seed(seed, first_id + k)) for k in range(num_loras)]
    streams = [_SampleStream(len(m), g) for m, g in zip(members, generators)]
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, warmup_steps))
    n_t = noise_scheduler.config.num_train_timesteps
    shape = tuple(latents.shape[1:])
    step_ids = torch.arange(num_loras).repeat_interleave(batch_per_lora)
    total = num_loras * batch_per_lora
    chunk = max_batch_size or total
    losses = np.zeros((steps, num_loras), dtype=np.float64)
    progress = Progress("lora-bank", steps, "steps", every=progress_every)
    rank, world = data_parallel or (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"train_lora_bank: data_parallel={data_parallel} is not (rank, world_size)")
    mine = torch.arange(rank, total, world)
    for step in range(steps):
        idx, noise, t = [], [], []
        for k in range(num_loras):  # fixed draw order per generator: samples, noise, timesteps
            idx.append(members[k][streams[k].take(batch_per_lora)])
            noise.append(torch.randn((batch_per_lora, *shape), generator=generators[k]))
            t.append(torch.randint(0, n_t, (batch_per_lora,), generator=generators[k]))
        idx, noise, t = torch.cat(idx), torch.cat(noise), torch.cat(t)
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros(num_loras, dtype=torch.float64)
        for lo in range(0, len(mine), chunk):
            sl = mine[lo:lo + chunk]
            loss, per_lora = bank_loss(
                unet, noise_scheduler, latents[idx[sl]].to(device), cond[idx[sl]].to(device), step_ids[sl].to(device),
                noise[sl].to(device, latents.dtype), t[sl].to(device), num_loras, min_snr_gamma,
                samples_per_lora=batch_per_lora)
            loss.backward()
            step_loss += per_lora.double().cpu()
        if world > 1:  # sum the ranks' shares: the gradient (and loss) of the whole step batch
            import torch.distributed as dist

            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(step_loss)
        if max_grad_norm is not None:
            clip_grad_norm_per_lora_(layers, max_grad_norm)
        opt.step()
        sched.step()
        losses[step] = step_loss.numpy()
        progress.update(1, loss=float(losses[max(0, step - 19):step + 1].mean()))
    return losses
