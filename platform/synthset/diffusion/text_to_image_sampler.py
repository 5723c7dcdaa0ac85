"""Sampling a text-to-image pipeline for a batch of generation requests, each image seeded by its own request.

``generate_batch(pipe, requests, steps, guidance)`` runs a diffusers text-to-image pipeline (the
embedded foundation model or Stable Diffusion, loaded with ``from_pretrained``) once for the
whole batch. Each request carries its ``prompt`` and ``seed``; the initial latent noise of an
image comes from a CPU ``torch.Generator`` seeded by that request alone, so an image does not
depend on the batch it is generated in or on the device (DESIGN.md, "Generation request"). The
denoising loop is the pipeline's own scheduler loop with classifier-free guidance (Ho & Salimans
2022). Every text-to-image method samples through here; ``lora.fused.fused_generate`` wraps it
with per-sample LoRA routing.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def generate_batch(pipe, requests: list[dict], num_inference_steps: int, guidance_scale: float,
                   height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) for ``requests``; each image seeded by its own request.

    ``height``/``width``: output size in pixels (a multiple of the VAE's downsampling factor);
    None: the UNet's native sample size.
    """
    device = pipe.unet.device
    generators = [torch.Generator(device="cpu").manual_seed(r["seed"]) for r in requests]
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"synthesis.resolution: {height}x{width} is not a multiple of the VAE's factor {scale}")
    # Initial noise from per-image CPU generators: identical on any device and in any batch.
    latents = torch.stack([torch.randn((pipe.unet.config.in_channels, height // scale, width // scale), generator=g)
                           for g in generators]).to(device, pipe.unet.dtype)
    out = pipe(prompt=[r["prompt"] for r in requests], latents=latents, height=height, width=width,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               output_type="np").images
    images = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    return images[..., 0] if images.shape[-1] == 1 else images
