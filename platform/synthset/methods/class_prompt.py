"""ClassPrompt: text-to-image generation with the prompt ``"a photo of a {class}"``.

The simplest method and the baseline of TCKR and LoFT. ``plan_requests`` turns an index range
into request rows; ``generate_batch`` runs the foundation pipeline on a batch of them with one
seeded generator per image, so an image depends only on its own request.
"""

from __future__ import annotations

import numpy as np
import torch

from synthset.methods.plan import class_for_index, derive_seed, image_key

METHOD = "class_prompt"


def plan_requests(start: int, stop: int, run_seed: int, class_names: list[str], prompt_template: str) -> list[dict]:
    """Request rows for images ``start … stop-1`` (see DESIGN.md, "Generation request")."""
    rows = []
    for index in range(start, stop):
        c = class_for_index(index, len(class_names))
        rows.append({"key": image_key(index), "index": index, "method": METHOD, "class_id": c,
                     "seed": derive_seed(run_seed, index),
                     "prompt": prompt_template.format(**{"class": class_names[c]})})
    return rows


@torch.no_grad()
def generate_batch(pipe, requests: list[dict], num_inference_steps: int, guidance_scale: float,
                   height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) for ``requests``; each image seeded by its own request."""
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
