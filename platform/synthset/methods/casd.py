"""CASD: a diffusion model trained on real and synthetic images with a source label, sampled as real (seed 001).

Algorithm 1 of the seed: the private images get source 0, a synthetic pool (any synthset
dataset, e.g. ClassPrompt's shards) source 1; one score network s(x, y, t) with a learned
embedding of the source label y (``diffusion.pixel_unet``: summed into the time embedding with the
class embedding) is trained with EDM's loss over the union (``stages/generator.py``,
``diffusion/generator_training.py``); generation fixes y = 0 and runs EDM's deterministic
2nd-order Heun sampler (``diffusion.edm.heun_sample``, σ 0.002–80, ρ = 7) for
``synthesis.num_inference_steps`` steps (18 at 32 px in EDM), with classifier-free guidance when
``synthesis.guidance_scale`` ≠ 1 (the class label drops to the null class, the source stays 0).

The baselines come from the same code and budget (``synthesis.casd.variant``): ``dm`` (private
images only) and ``sda`` (private ∪ pool without a source label). One method with a variant,
not three methods: they share every setting, the generator stage, the planner and the sampler, and
differ only in what the network is conditioned on and trains on, so a comparison is one flag
(``--set synthesis.casd.variant=sda``) and their stage hashes differ exactly by it.

Each sample's JSON records its conditioning: ``source`` (0; None for dm and sda, whose network has
no source label), ``variant``, ``sampler`` and ``guidance_scale``.

    python jobs/pipeline.py --config conf/casd.yaml [--set synthesis.casd.variant=dm]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synthset.config import DiffusionTrainConfig, Section, Uri, check_unet_levels
from synthset.methods import Method, base_context, get_method, method_names
from synthset.methods.plan import class_for_index, derive_seed, image_key

NAME = "casd"
REAL_SOURCE = 0  # Algorithm 1, line 8: sample with the source label of the real data


# ``synthesis.casd``: CASD's own settings, validated by the config through the registry (``Method.settings``).
class PixelUNetArch(Section):
    """A pixel-space ``diffusion.pixel_unet.ConditionalPixelUNet`` (CASD's score network)."""

    channels: list[int] = Field([32, 64, 64], min_length=1, max_length=5, description="UNet block widths "
                                "(each level after the first halves the resolution).")
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: list[int] = Field([2], description="UNet levels with self-attention (0 = full resolution).")
    attention_head_dim: int = Field(8, ge=1)
    norm_groups: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _shapes(self):
        check_unet_levels(self.channels, self.norm_groups, self.attention_levels)
        return self


class GeneratorTrainConfig(DiffusionTrainConfig):
    """CASD's generator training: the shared recipe plus a warm-up and class dropout."""

    warmup_steps: int = Field(50, ge=0)
    class_dropout: float = Field(0.1, ge=0, le=1, description="Probability of the null class per image "
                                 "(classifier-free guidance at synthesis.guidance_scale > 1).")


class CASDPoolConfig(Section):
    """CASD's synthetic pool (source 1): an existing synthset dataset, or one generated here first."""

    path: Uri | None = Field(None, min_length=1, description="A synthset dataset (directory or URI holding "
                             "manifest.json), e.g. a ClassPrompt run's synthesis/<hash>/data.")
    method: str | None = Field(None, min_length=1, description="Generate the pool first with this registered "
                               "method under this config (its own stages and synthesis stage, cached like any "
                               "run of that method), with the pool.* synthesis settings below.")
    images_per_class: int = Field(1000, ge=1, description="pool.method: images per class of the pool.")
    num_inference_steps: int = Field(10, ge=1, le=1000, description="pool.method: its sampling steps.")
    guidance_scale: float = Field(1.75, ge=0, le=50, description="pool.method: its guidance scale.")
    size: int | None = Field(None, ge=1, description="Use at most this many pool images (a seeded subset; the "
                             "seed's m); null: all.")
    mismatch: Literal["none", "other_classes", "corrupt"] = Field(
        "none", description="none: the pool as it is; other_classes: every pool image is trained under the next "
        "class ((c + 1) mod C), a pool whose class-conditional distributions miss the real ones (seed 001, Sec. 4.3); "
        "corrupt: every pool image is degraded (4x box down/up-sampling plus Gaussian noise of std 0.3, seeded).")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is not None and self.method is not None:
            raise ValueError("set one of pool.path (an existing dataset) and pool.method (generate one), not both")
        if self.method is not None:
            if self.method not in method_names():
                raise ValueError(f"pool.method: unknown method {self.method!r} (choose from {', '.join(method_names())})")
            if "generator" in get_method(self.method).needs:
                raise ValueError(f"pool.method: {self.method!r} trains its own generator; choose a method that "
                                 "generates with the foundation model")
        return self


class CASDConfig(Section):
    """CASD (seed 001) and its baselines from the same code and budget (``methods/casd.py``)."""

    variant: Literal["casd", "sda", "dm"] = Field(
        "casd", description="casd: private (source 0) + pool (source 1) with a learned source embedding, sampled "
        "at source 0; sda: private ∪ pool, no source label; dm: the private images only (the pool is not read).")
    real_images: int | None = Field(None, ge=1, description="Private images the generator trains on: a seeded, "
                                    "class-balanced subset of the private split (the seed's n); null: all.")
    pool: CASDPoolConfig = CASDPoolConfig()
    model: PixelUNetArch = PixelUNetArch()
    train: GeneratorTrainConfig = GeneratorTrainConfig()


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    """Request rows for images ``start … stop-1``: class, seed and the source label sampled with."""
    names = context.class_names
    return [{"key": image_key(i), "index": i, "method": NAME, "class_id": class_for_index(i, len(names)),
             "seed": derive_seed(run_seed, i), "source": REAL_SOURCE} for i in range(start, stop)]


def plan_context(cfg, class_names: list[str], artifacts: dict):
    return base_context(cfg, class_names)


def load_generator(model_path: str, loras, synthesis, device: str = "cpu", dtype=None):
    """The trained network (``model_path``: the generator stage's ``model/``, EMA weights) on ``device``."""
    from synthset import storage
    from synthset.diffusion.pixel_unet import ConditionalPixelUNet

    net = ConditionalPixelUNet.from_pretrained(storage.materialize(model_path) if "://" in model_path else model_path)
    net = net.to(device, dtype) if dtype is not None else net.to(device)
    return {"net": net.eval(), "device": device, "variant": synthesis.casd.variant}


class GuidedDenoiser:
    """D_w(x; σ) = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅)) (classifier-free guidance), one batched call."""

    def __init__(self, denoiser, scale: float, null_class: int):
        self.denoiser, self.scale, self.null = denoiser, scale, null_class
        self.sigma_data = denoiser.sigma_data

    def __call__(self, x, sigma, class_labels, **cond):
        import torch

        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        labels = torch.cat([class_labels, torch.full_like(class_labels, self.null)])
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels, **both)
        cond_out, uncond = out.chunk(2)
        return uncond + self.scale * (cond_out - uncond)


def generate_batch(generator: dict, requests: list[dict], synthesis):
    """uint8 images of ``requests``: EDM Heun from each request's own seeded noise, source fixed to 0."""
    import torch

    from synthset.diffusion.edm import EDMDenoiser, heun_sample, initial_noise, karras_sigmas
    from synthset.diffusion.generator_training import to_uint8

    net, device = generator["net"], generator["device"]
    c = net.config
    noise = initial_noise([r["seed"] for r in requests], (c.in_channels, c.sample_size, c.sample_size), device)
    cond = {"class_labels": torch.tensor([int(r["class_id"]) for r in requests], device=device)}
    if c.num_sources:
        cond["source"] = torch.tensor([int(r["source"]) for r in requests], device=device)
    denoiser = EDMDenoiser(net)
    if synthesis.guidance_scale != 1.0:
        denoiser = GuidedDenoiser(denoiser, synthesis.guidance_scale, net.null_class)
    x = heun_sample(denoiser, noise, karras_sigmas(synthesis.num_inference_steps), **cond)
    for r in requests:  # what conditioned each sample, recorded in its JSON
        r["source"] = int(r["source"]) if c.num_sources else None
        r["variant"], r["sampler"] = generator["variant"], "edm_heun"
    return to_uint8(x)


def uses_pool(cfg) -> bool:
    return cfg.synthesis.casd.variant in ("casd", "sda")


def check_pool(cfg) -> None:
    """casd and sda need a pool: ``pool.path`` (which must hold a manifest) or ``pool.method``."""
    from synthset import storage

    pool = cfg.synthesis.casd.pool
    if not uses_pool(cfg):
        return
    if pool.path is None and pool.method is None:
        raise ValueError(f"synthesis.casd.pool.path: variant {cfg.synthesis.casd.variant!r} trains on a synthetic "
                         "pool; set pool.path (a synthset dataset) or pool.method (generate one first)")
    if pool.path is not None and not storage.exists_or_explain(storage.join(pool.path, "manifest.json"),
                                                             "synthesis.casd.pool.path"):
        raise FileNotFoundError(f"synthesis.casd.pool.path: {storage.join(pool.path, 'manifest.json')} not found "
                                "(expected a complete synthset dataset)")


def check(cfg, private_labels, class_names: list[str]) -> None:
    """Before any work: the sampler's steps, the output size, the pool, and enough private images per class."""
    syn, casd = cfg.synthesis, cfg.synthesis.casd
    if syn.num_inference_steps < 2:
        raise ValueError(f"synthesis.num_inference_steps: casd's Heun sampler needs >= 2 steps, got "
                         f"{syn.num_inference_steps}")
    if syn.resolution is not None and syn.resolution != cfg.data.image_size:
        raise ValueError(f"synthesis.resolution: casd generates at the size it trains on, data.image_size "
                         f"({cfg.data.image_size}); got {syn.resolution} (leave it null)")
    if casd.real_images is not None and casd.real_images < len(class_names):
        raise ValueError(f"synthesis.casd.real_images: {casd.real_images} is fewer than the {len(class_names)} classes")
    arch = casd.model
    if cfg.data.image_size % (2 ** (len(arch.channels) - 1)):
        raise ValueError(f"synthesis.casd.model.channels: {len(arch.channels)} levels halve data.image_size "
                         f"({cfg.data.image_size}) {len(arch.channels) - 1} times; it must divide evenly")
    if casd.train.batch_size < casd.train.workers:
        raise ValueError(f"synthesis.casd.train.batch_size ({casd.train.batch_size}) is smaller than "
                         f"train.workers ({casd.train.workers})")
    check_pool(cfg)


METHOD = Method(NAME, plan_requests=plan_requests, plan_context=plan_context, load_generator=load_generator,
                generate_batch=generate_batch, needs=("generator",), reads=("synthesis.casd",), check=check,
                generator="casd_generator", settings=CASDConfig,
                execution_only=("synthesis.casd.train.checkpoint_every", "synthesis.casd.train.sample_every"))
