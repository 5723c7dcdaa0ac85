"""RCDM (seed 002): generation conditioned on an image encoder's embedding of a real private image.

Needs the embeddings of the private images (``stages/embed.py``) and its own generator, a denoiser
trained on them (``stages/rcdm.py``, ``diffusion/rcdm.py``). Request ``index`` of class
``c = index mod C`` uses slot ``index div C``: the real image of that class at position
``slot mod n_c`` (private-split order), so the real embeddings are used in turn and every pass over
them draws new seeds (``derive_seed(run seed, index)``); the chosen real image is recorded in the
sample's JSON (``embedding_index``, its index in the prepared training split). With
``synthesis.rcdm.model.conditioning: class`` the same code is the class-conditioned baseline.
Sampling: DDPM (the seed: 100 steps) or DDIM, ``synthesis.num_inference_steps`` steps. The
centroid-band filter (``synthesis.rcdm.filter``) runs after synthesis (``stages/rcdm.py``).

    python jobs/pipeline.py --config conf/rcdm.yaml [--set synthesis.rcdm.filter.enabled=true]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synthset.config import DiffusionTrainConfig, Section, Uri, check_unet_levels
from synthset.methods import Method, base_context
from synthset.methods.plan import class_for_index, derive_seed, image_key

NAME = "rcdm"


# ``synthesis.rcdm``: RCDM's own settings, validated by the config through the registry (``Method.settings``).
class RCDMEmbedConfig(Section):
    """RCDM's image encoder (``stages/embed.py``): what embeds the private images and the generated ones."""

    encoder: Uri = Field("public_cnn", min_length=1, description="'public_cnn': a small CNN the embed stage trains "
                         "on the public split (the embedded default: an encoder that never saw a private image, "
                         "like DINOv2 never saw the private set); otherwise a transformers image model (DINOv2, CLIP "
                         "vision) by hub id or local directory: its pooled/CLS output is the embedding.")
    # encoder=public_cnn: the small CNN of the classifiers (models/classifiers.py) and its training recipe.
    public_width: int = Field(16, ge=4, description="encoder=public_cnn: channels of its first stage.")
    public_epochs: int = Field(3, ge=1, description="encoder=public_cnn: epochs over the public split.")
    public_lr: float = Field(3e-3, gt=0, le=1)
    public_seed: int = Field(0, ge=0)
    batch_size: int = Field(256, ge=1)
    real_images: int | None = Field(None, ge=1, description="A class-balanced, seeded subset of the private split "
                                    "that is embedded, trained on and conditioned on (the RCDM 'private set'); "
                                    "null: all of it.")
    seed: int = Field(0, ge=0, description="Seeds the real_images subset.")


class RCDMModelConfig(Section):
    """RCDM's denoiser (``diffusion/rcdm.py``): a pixel-space UNet and how the embedding enters it."""

    conditioning: Literal["time", "cross_attention", "class"] = Field(
        "time", description="time: a projection of the embedding added to the time embedding; cross_attention: "
        "the embedding as one token the UNet attends to; class: the class-conditioned baseline (embedding off).")
    channels: list[int] = Field([32, 64], min_length=1, max_length=5, description="UNet block widths.")
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: list[int] = Field([], description="time/class: UNet levels with self-attention (0 = full "
                                        "resolution); cross_attention attends at every level but 0.")
    norm_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10, le=10000)

    @model_validator(mode="after")
    def _groups(self):
        check_unet_levels(self.channels, self.norm_groups, self.attention_levels)
        return self


class RCDMTrainConfig(DiffusionTrainConfig):
    """RCDM's denoiser: the shared recipe with RCDM's defaults; no warm-up and no class dropout, and the learning
    rate decays by a half cosine to zero over ``steps`` (as RCDM trained before it moved to Ray Train)."""

    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate at step 0 (cosine decay to 0 at steps).")


class RCDMFilterConfig(Section):
    """Centroid-band filtering (RCDM seed §3.2): per class, rank generated images by the distance of their
    embedding to the class centroid of the real private embeddings; keep ranks in [low, high) of each class."""

    enabled: bool = False
    low: float = Field(0.25, ge=0, lt=1, description="Fraction of each class nearest its centroid that is dropped.")
    high: float = Field(0.75, gt=0, le=1, description="Kept up to this rank fraction; 1 - high (farthest) is dropped.")
    metric: Literal["l2", "cosine"] = "l2"

    @model_validator(mode="after")
    def _band(self):
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be > low ({self.low})")
        return self


class RCDMConfig(Section):
    """RCDM (seed 002): diffusion conditioned on an encoder's embedding of a real private image."""

    embed: RCDMEmbedConfig = RCDMEmbedConfig()
    model: RCDMModelConfig = RCDMModelConfig()
    train: RCDMTrainConfig = RCDMTrainConfig()
    sampler: Literal["ddpm", "ddim"] = Field("ddpm", description="ddpm (the seed, 100 steps) or ddim (eta 0); "
                                             "steps: synthesis.num_inference_steps.")
    filter: RCDMFilterConfig = RCDMFilterConfig()




def plan_requests(start: int, stop: int, run_seed: int, num_classes: int) -> list[dict]:
    """Request rows for images ``start … stop-1``: class, seed and which turn of its class's embeddings."""
    return [{"key": image_key(i), "index": i, "method": NAME, "class_id": class_for_index(i, num_classes),
             "seed": derive_seed(run_seed, i), "embedding_slot": i // num_classes} for i in range(start, stop)]


def plan(start: int, stop: int, run_seed: int, context) -> list[dict]:
    return plan_requests(start, stop, run_seed, len(context.class_names))


def plan_context(cfg, class_names: list[str], artifacts: dict):
    return base_context(cfg, class_names)


def load_generator(model_path: str, loras, synthesis, device: str, dtype):
    """The trained denoiser and the real embeddings it is conditioned on, grouped by class.

    ``model_path``: the rcdm_generator stage's ``model/``, a local path or an object-store URI (read through
    a cached local copy, ``storage.materialize``); its ``rcdm.json`` names the embeddings file, either too."""
    import numpy as np
    import torch

    from synthset import storage
    from synthset.diffusion.rcdm import load_denoiser
    from synthset.models.encoders import read_embeddings

    model, meta = load_denoiser(storage.materialize(model_path), device)
    if dtype is not None:
        model = model.to(dtype)
    arrays = read_embeddings(meta["embeddings"])
    labels = arrays["labels"]
    rows = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    return {"model": model, "device": device, "dtype": dtype,
            "embeddings": torch.from_numpy(arrays["embeddings"]), "index": arrays["index"], "rows": rows}


def embedding_rows(generator: dict, requests: list[dict]) -> list[int]:
    """Row of the real embedding each request is conditioned on (class's real images in turn)."""
    out = []
    for r in requests:
        rows = generator["rows"].get(int(r["class_id"]))
        if rows is None or len(rows) == 0:
            raise ValueError(f"class {r['class_id']} has no real embedding to condition on")
        out.append(int(rows[int(r["embedding_slot"]) % len(rows)]))
    return out


def generate_batch(generator: dict, requests: list[dict], synthesis):
    """uint8 images of a batch of requests; records each request's real image (``embedding_index``)."""
    import torch

    from synthset.diffusion.rcdm import sample, to_uint8

    model = generator["model"]
    rows = embedding_rows(generator, requests)
    conditioning = model.conditioning
    emb = generator["embeddings"][rows] if conditioning != "class" else None
    if emb is not None and generator["dtype"] is not None:
        emb = emb.to(generator["dtype"])
    labels = torch.tensor([int(r["class_id"]) for r in requests])
    x = sample(model, [r["seed"] for r in requests], emb, labels, synthesis.rcdm.sampler,
               synthesis.num_inference_steps, generator["device"])
    for r, row in zip(requests, rows):  # the sample's JSON records what conditioned it
        r["conditioning"] = conditioning
        r["sampler"] = synthesis.rcdm.sampler
        if conditioning != "class":
            r["embedding_index"] = int(generator["index"][row])
    return to_uint8(x)


def check(cfg, private_labels, class_names: list[str]) -> None:
    """Before any work: the encoder exists, every class has real images, the filter keeps some of each."""
    import numpy as np

    from synthset.models.encoders import check_encoder

    rc = cfg.synthesis.rcdm
    check_encoder(rc.embed.encoder)
    missing = [class_names[c] for c in range(len(class_names)) if not np.any(private_labels == c)]
    if missing:
        raise ValueError(f"synthesis.method=rcdm: classes {missing} have no private image to embed")
    if rc.filter.enabled:
        n = cfg.synthesis.images_per_class
        if int(np.floor(rc.filter.high * n + 1e-9)) - int(np.floor(rc.filter.low * n + 1e-9)) < 1:
            raise ValueError(f"synthesis.rcdm.filter: the band [{rc.filter.low}, {rc.filter.high}) keeps no image "
                             f"of {n} per class (synthesis.images_per_class)")


METHOD = Method(NAME, plan_requests=plan, plan_context=plan_context, load_generator=load_generator,
                generate_batch=generate_batch, needs=("embeddings", "generator"), reads=("synthesis.rcdm",),
                check=check, generator="rcdm_generator", after_synthesis="rcdm_filter", settings=RCDMConfig,
                # the filter runs after synthesis (stage rcdm_filter): not among the synthesis stage's inputs
                after_synthesis_settings=("synthesis.rcdm.filter",),
                execution_only=("synthesis.rcdm.train.checkpoint_every", "synthesis.rcdm.train.sample_every"))
