"""Training a latent text-to-image model the way Stable Diffusion is trained, as plain functions.

``train_vae`` fits the autoencoder (reconstruction + a small KL term); ``encode_latents`` maps
images to scaled latents once; ``train_unet`` fits the UNet (and the text encoder) to predict the
noise of DDPM-noised latents given the prompt, with prompt dropout so classifier-free guidance
works at sampling time (Ho & Salimans 2022). Each image can have two prompts, a class prompt and a
caption prompt (TCKR's ``"{class}: {caption}"``); every step draws which one it is shown, so the
model learns both. No Ray here: ``stages/foundation.py`` wraps these.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from synthset.diffusion.schedules import cosine_with_warmup, ema_decay_at, min_snr_weights
from synthset.progress import Progress


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` batches drawn by epochs of seeded permutations."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              seed: int, progress_every: float = 10.0) -> list[float]:
    """Fit ``vae`` to ``images`` (float, [-1, 1], N×C×H×W). Returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, max(1, steps // 20)))
    vae.train()
    losses, progress = [], Progress("vae", steps, "steps", every=progress_every)
    for idx in _batches(len(images), min(batch_size, len(images)), steps, g):
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        # Drawn on the CPU generator, then moved to the model's device: the same draws on any device.
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(1, loss=float(np.mean(losses[-20:])))
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Posterior means of ``images``, unscaled (multiply by ``vae.config.scaling_factor`` to use)."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class EMA:
    """Exponential moving average of parameters, with the warm-up of ``schedules.ema_decay_at``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = ema_decay_at(self.n, self.decay)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def caption_prompts(labels, class_names: list[str], captions: list[str], template: str) -> list[str]:
    """``template`` (e.g. TCKR's ``"{class}: {caption}"``) filled with each image's class name and caption."""
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} captions for {len(labels)} images")
    return [template.format(**{"class": class_names[int(c)], "caption": cap}) for c, cap in zip(labels, captions)]


def choose_prompts(idx: torch.Tensor, prompt_ids: torch.Tensor, caption_ids: torch.Tensor | None,
                   caption_probability: float, prompt_dropout: float, empty_id: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Prompt ids for the images ``idx`` of one training batch.

    Each image is shown its caption prompt with probability ``caption_probability`` (when it has
    one), else its class prompt; then, with probability ``prompt_dropout``, the empty prompt
    (classifier-free guidance's unconditional branch). Drawn from ``generator``: deterministic.
    """
    p = prompt_ids[idx]
    if caption_ids is not None:
        use_caption = torch.rand(len(idx), generator=generator) < caption_probability
        p = torch.where(use_caption, caption_ids[idx], p)
    drop = torch.rand(len(idx), generator=generator) < prompt_dropout
    return torch.where(drop, torch.full_like(p, empty_id), p)


def train_unet(unet, text_encoder, tokenizer, noise_scheduler, latents: torch.Tensor, prompts: list[str],
               steps: int, batch_size: int, lr: float, prompt_dropout: float, seed: int,
               train_text_encoder: bool = True, min_snr_gamma: float | None = 5.0, ema_decay: float | None = 0.999,
               progress_every: float = 10.0, captioned_prompts: list[str] | None = None,
               caption_probability: float = 0.0) -> list[float]:
    """Denoising score matching on scaled ``latents`` (N×C×h×w) with one or two prompts per latent.

    ``prompts[i]`` conditions ``latents[i]``, or, with probability ``caption_probability`` per
    step, ``captioned_prompts[i]`` (see ``choose_prompts``); with probability ``prompt_dropout``
    either is replaced by the empty prompt, which is what guidance uses as its unconditional
    branch. Min-SNR-γ loss weighting and an EMA of the weights (copied into the models at the
    end) make short training runs converge to much better samples.
    """
    if captioned_prompts is not None and len(captioned_prompts) != len(prompts):
        raise ValueError(f"{len(captioned_prompts)} caption prompts for {len(prompts)} images")
    g = torch.Generator().manual_seed(seed)
    # NHWC convolutions: ~20 % faster fwd+bwd on CPU here (docs/benchmarks.md); back to NCHW at the end.
    unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, max(1, steps // 20)))
    unet.train()
    text_encoder.train(train_text_encoder)
    text_encoder.requires_grad_(train_text_encoder)
    ema = EMA(params, ema_decay) if ema_decay else None
    # Unique prompts are few (class prompts, property captions): tokenize each once.
    vocab = sorted(set(prompts) | set(captioned_prompts or []) | {""})
    position = {p: i for i, p in enumerate(vocab)}
    prompt_index = torch.tensor([position[p] for p in prompts])
    caption_index = torch.tensor([position[p] for p in captioned_prompts]) if captioned_prompts is not None else None
    ids_all = tokenizer(vocab, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    empty = position[""]
    n_t = noise_scheduler.config.num_train_timesteps
    losses, progress = [], Progress("unet", steps, "steps", every=progress_every)
    for idx in _batches(len(latents), min(batch_size, len(latents)), steps, g):
        x0 = latents[idx]
        p = choose_prompts(idx, prompt_index, caption_index, caption_probability, prompt_dropout, empty, g)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.randint(0, n_t, (len(idx),), generator=g).to(x0.device)
        xt = noise_scheduler.add_noise(x0, noise, t).contiguous(memory_format=torch.channels_last)
        context = text_encoder(ids_all[p])[0]
        pred = unet(xt, t, encoder_hidden_states=context).sample
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma:
            per_sample = per_sample * min_snr_weights(noise_scheduler, t, min_snr_gamma)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        losses.append(loss.item())
        progress.update(1, loss=float(np.mean(losses[-50:])))
    if ema is not None:
        ema.copy_to_params()
    unet.to(memory_format=torch.contiguous_format)
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return losses
