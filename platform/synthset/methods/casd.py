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

from synthset.methods import Method, base_context
from synthset.methods.plan import class_for_index, derive_seed, image_key

NAME = "casd"
REAL_SOURCE = 0  # Algorithm 1, line 8: sample with the source label of the real data


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
                generator="casd_generator")
