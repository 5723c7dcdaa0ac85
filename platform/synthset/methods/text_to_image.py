"""How the text-to-image methods load their generator and generate a batch (not a method itself).

The generator is the foundation pipeline (``foundation.path``, or the embedded model), loaded with
``from_pretrained``; a method with LoRAs (``Method.lora``) gets its adapted bank
(``stages/adapt.py``) loaded into the UNet. A batch is sampled by
``diffusion.text_to_image_sampler.generate_batch``, through ``lora.fused.fused_generate`` when
each sample routes its own LoRA mix (DataDream, LoFT), directly when the method has no LoRA or
folds its single one into the UNet (TCKR: ``LoraAdaptation.fold_into_unet``). The registry
imports this module: torch and the models are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any


@dataclass
class TextToImageGenerator:
    """The loaded foundation pipeline and whether each sample routes its own LoRA mix (DataDream, LoFT)."""

    pipe: Any
    routes_each_sample: bool


def loader(lora=None):
    """The ``Method.load_generator`` of a text-to-image method with the LoRAs ``lora`` (a ``LoraAdaptation``;
    None: the plain foundation model)."""
    return partial(load_generator, lora=lora)


def load_generator(model_path: str, loras: str | None, synthesis, device: str = "cpu", dtype=None, *,
                   lora=None) -> TextToImageGenerator:
    """The foundation pipeline on ``device`` (``dtype``: None keeps the saved one), with the LoRA bank
    ``loras`` of the method's adaptation ``lora`` (``synthesis``: the ``SynthesisConfig``, for compile)."""
    import torch

    from synthset.models.foundation import load_foundation

    pipe = load_foundation(model_path, device=device, dtype=dtype)
    if loras:  # the adapted LoRAs, every one of them, routed per sample at generation time
        from synthset.lora.bank import fold_lora_into_base, load_bank_into

        load_bank_into(pipe.unet, loras)
        if lora is not None and lora.fold_into_unet:  # one LoRA for every image: merged, base speed
            fold_lora_into_base(pipe.unet, 0, 1.0)
    if synthesis.compile:
        pipe.unet = torch.compile(pipe.unet)
    return TextToImageGenerator(pipe, routes_each_sample=lora is not None and not lora.fold_into_unet)


def generate_batch(generator: TextToImageGenerator, requests: list[dict], synthesis):
    """uint8 images (N, H, W[, C]) of ``requests`` with the steps, guidance and size of ``synthesis``."""
    if generator.routes_each_sample:
        from synthset.lora.fused import fused_generate as sample
    else:
        from synthset.diffusion.text_to_image_sampler import generate_batch as sample
    return sample(generator.pipe, requests, synthesis.num_inference_steps, synthesis.guidance_scale,
                  synthesis.resolution, synthesis.resolution)
