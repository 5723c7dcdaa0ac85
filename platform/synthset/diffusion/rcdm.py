"""RCDM (seed 002): a pixel-space denoiser conditioned on an image encoder's embedding of a real image.

Plain functions of tensors, seeds and settings (no Ray): building the conditioned UNet, the DDPM
training loss and its ``generator_training.Objective`` (``DDPM``: RCDM trains through the same loop,
checkpoints and Ray Train driver as CASD), the DDPM / DDIM sampling loops (explicit, one seeded
generator per image), and the centroid-band filter of §3.2.

Conditioning (``RCDMModelConfig.conditioning``):

* ``time``: the embedding, projected by a linear layer to the time-embedding width, is added to the
  time embedding (the "projection class embedding" of the seed's method notes), through the
  platform's ``diffusion.pixel_unet.ConditionalPixelUNet`` (shared with CASD).
* ``cross_attention``: ``UNet2DConditionModel`` whose attention blocks attend to one token, the
  projected embedding (the seed's "single embedding token").
* ``class``: the class-conditioned baseline (the seed's Cond-LDM): the same UNet as ``time`` with a
  learned class embedding instead of the embedding projection, same size and training budget.

Training is ε-prediction DDPM (Ho et al. 2020, Algorithm 1) with diffusers' ``DDPMScheduler``
(linear β, 1000 steps): ``train_steps(state, data, settings, stop, objective=DDPM)`` with the
embeddings in ``TrainingSet.embeddings`` and each step's timesteps and noise drawn from (seed, step),
so a run resumed from a checkpoint equals an unbroken one; sampling is DDPM ancestral (Algorithm 2;
the seed uses 100 steps) or DDIM (Song et al. 2021, Eq. 12 with η = 0).

Run it through the pipeline: ``python jobs/pipeline.py --config conf/rcdm.yaml``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from synthset.diffusion.generator_training import Objective

CONDITIONINGS = ("time", "cross_attention", "class")


class RCDMDenoiser(nn.Module):
    """ε(x_t, t | condition): a conditioned UNet and the condition it reads.

    ``arch``: image_size, image_channels, channels, layers_per_block, norm_groups, attention_levels,
    conditioning, embed_dim (the encoder's width), num_classes, num_train_timesteps.

    ``time`` and ``class`` use the platform's ``diffusion.pixel_unet.ConditionalPixelUNet`` (the CASD
    network: conditions summed into the time embedding; here the DDPM timestep goes to its
    positional embedding); ``cross_attention`` is a ``UNet2DConditionModel`` given the projected
    embedding as its one ``encoder_hidden_states`` token.
    """

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = dict(arch)
        mode = arch["conditioning"]
        if mode not in CONDITIONINGS:
            raise ValueError(f"conditioning: {mode!r} is not one of {CONDITIONINGS}")
        channels = list(arch["channels"])
        width = channels[0] * 4  # the time-embedding width of both UNets
        if mode == "cross_attention":
            from diffusers import UNet2DConditionModel

            # Attention to the one embedding token at every level but the first (the widest maps).
            down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1)
            up = ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"]
            self.unet = UNet2DConditionModel(
                sample_size=arch["image_size"], in_channels=arch["image_channels"],
                out_channels=arch["image_channels"], block_out_channels=tuple(channels),
                layers_per_block=arch["layers_per_block"], norm_num_groups=arch["norm_groups"],
                down_block_types=tuple(down), up_block_types=tuple(up), cross_attention_dim=width,
                attention_head_dim=8)
            self.token = nn.Linear(arch["embed_dim"], width)
        else:
            from synthset.diffusion.pixel_unet import ConditionalPixelUNet

            self.unet = ConditionalPixelUNet(
                sample_size=arch["image_size"], in_channels=arch["image_channels"],
                block_out_channels=tuple(channels), layers_per_block=arch["layers_per_block"],
                attention_levels=tuple(arch.get("attention_levels", ())), norm_num_groups=arch["norm_groups"],
                num_classes=arch["num_classes"] if mode == "class" else 0,
                embedding_dim=arch["embed_dim"] if mode == "time" else 0)

    @property
    def conditioning(self) -> str:
        return self.arch["conditioning"]

    @property
    def config(self) -> dict:
        """The architecture, under the name training checkpoints record a network's config by."""
        return self.arch

    def forward(self, x: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        """Predicted noise for noisy images ``x`` (B, C, H, W) at timesteps ``t`` (B,); ``embeddings``
        (B, D) for time/cross_attention, ``labels`` (B,) for class (the other is ignored)."""
        if self.conditioning == "class":
            return self.unet(x, t.float(), class_labels=labels)
        if self.conditioning == "time":
            return self.unet(x, t.float(), embedding=embeddings)
        dtype = self.token.weight.dtype  # bf16/fp16 weights on GPU: inputs follow, the output is float32
        token = self.token(embeddings.to(x.device, dtype))[:, None, :]
        return self.unet(x.to(dtype), t, encoder_hidden_states=token).sample.float()


def build_denoiser(arch: dict, seed: int = 0) -> RCDMDenoiser:
    torch.manual_seed(seed)
    return RCDMDenoiser(arch)


def save_denoiser(model: RCDMDenoiser, directory: str | Path, extra: dict | None = None) -> None:
    """``model.safetensors`` + ``rcdm.json`` (architecture and ``extra``, e.g. where the embeddings are)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "rcdm.json").write_text(json.dumps({"arch": model.arch, **(extra or {})}, indent=1))


def load_denoiser(directory: str | Path, device: str = "cpu") -> tuple[RCDMDenoiser, dict]:
    """(model in eval mode, its ``rcdm.json``) from a directory written by ``save_denoiser``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "rcdm.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no RCDM denoiser here")
    meta = json.loads(meta_path.read_text())
    model = RCDMDenoiser(meta["arch"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.to(device).eval(), meta


def make_scheduler(kind: str, num_train_timesteps: int):
    """diffusers' DDPM or DDIM scheduler over the training noise schedule (linear β, ε-prediction)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                             prediction_type="epsilon", clip_sample=True)
    if kind == "ddim":
        return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                             prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True)
    raise ValueError(f"sampler: {kind!r} is not 'ddpm' or 'ddim'")


def ddpm_timesteps(model: RCDMDenoiser, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A step's timesteps (B,), uniform over the training schedule (DDPM, Algorithm 1 line 3)."""
    return torch.randint(0, model.arch.get("num_train_timesteps", 1000), (batch_size,), generator=generator)


def ddpm_loss_at(model: RCDMDenoiser, scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 class_labels: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖² (mean over pixels; DDPM, Algorithm 1 line 5) with t and
    ε given, so that they are drawn for the whole step (``generator_training.step_draws``) and shared out."""
    noisy = scheduler.add_noise(x0, noise, t)
    return ((model(noisy, t, embedding, class_labels).float() - noise) ** 2).flatten(1).mean(1)


def ddpm_loss(model: RCDMDenoiser):
    """``ddpm_loss_at`` with the model's noise schedule built once."""
    return functools.partial(ddpm_loss_at, model, make_scheduler("ddpm", model.arch.get("num_train_timesteps", 1000)))


def grid_samples(model: RCDMDenoiser, data, device, per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, class ids) for a training grid: per class, DDIM samples (10 steps) conditioned on the
    embeddings of its first ``per_class`` training images (or on the class, for the class baseline)."""
    rows = torch.cat([(data.class_labels == c).nonzero()[:per_class, 0] for c in range(data.num_classes)])
    embeddings = data.embeddings[rows] if data.embeddings is not None else None
    images = sample(model, [12345 + i for i in range(len(rows))], embeddings, data.class_labels[rows], "ddim", 10,
                    str(device))
    return to_uint8(images), data.class_labels[rows].numpy()


@torch.no_grad()
def sample(model: RCDMDenoiser, seeds: list[int], embeddings: torch.Tensor | None, labels: torch.Tensor | None,
           sampler: str = "ddpm", steps: int = 100, device: str = "cpu") -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W), one per seed, conditioned on ``embeddings`` (B, D) / ``labels`` (B,).

    Each image draws its initial noise and (DDPM) every step's noise from its own ``torch.Generator``
    seeded with its seed, so an image depends only on (seed, condition), not on the batch it is in.
    The loop is written out: predict ε, then the scheduler's posterior step (DDPM Algorithm 2 line 4,
    or DDIM Eq. 12 with η = 0), per image where the step draws noise.
    """
    arch = model.arch
    scheduler = make_scheduler(sampler, arch.get("num_train_timesteps", 1000))
    scheduler.set_timesteps(steps)
    shape = (arch["image_channels"], arch["image_size"], arch["image_size"])
    gens = [torch.Generator().manual_seed(int(s) % (2 ** 63)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    emb = embeddings.to(device) if embeddings is not None else None
    lab = labels.to(device) if labels is not None else None
    for t in scheduler.timesteps:
        eps = model(x, t.to(device).expand(len(x)), emb, lab)
        if sampler == "ddpm":
            x = torch.cat([scheduler.step(eps[i:i + 1], t, x[i:i + 1], generator=gens[i]).prev_sample
                           for i in range(len(x))])
        else:
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) → uint8 (B, H, W) for one channel, (B, H, W, 3) for RGB."""
    out = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return out[:, 0] if out.shape[1] == 1 else out.transpose(0, 2, 3, 1)


# RCDM's denoiser trained with the DDPM loss, sampled with DDIM for the training grids.
DDPM = Objective(RCDMDenoiser, ddpm_timesteps, ddpm_loss, grid_samples)


# --- Centroid-band filtering (seed §3.2) -------------------------------------------------------------

def class_centroids(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, metric: str = "l2") -> np.ndarray:
    """Mean embedding of each class (cosine: of the unit-normalised embeddings); (num_classes, D)."""
    e = _normalise(embeddings, metric)
    out = np.zeros((num_classes, e.shape[1]), dtype=np.float64)
    for c in range(num_classes):
        rows = e[labels == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no real embedding to make a centroid from")
        out[c] = rows.mean(0)
    return out


def centroid_distances(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                       metric: str = "l2") -> np.ndarray:
    """Distance of each embedding to the centroid of its class: Euclidean, or 1 − cosine similarity."""
    e = _normalise(embeddings, metric)
    c = centroids[labels]
    if metric == "l2":
        return np.linalg.norm(e - c, axis=1)
    return 1.0 - (e * c).sum(1) / np.maximum(np.linalg.norm(c, axis=1), 1e-12)


def _normalise(e: np.ndarray, metric: str) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    if metric == "cosine":
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    if metric != "l2":
        raise ValueError(f"metric: {metric!r} is not 'l2' or 'cosine'")
    return e


def band_keep(distances: np.ndarray, labels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Boolean mask of the kept images: per class of n images, sorted by (distance, position), keep ranks
    ``floor(low·n) ≤ rank < floor(high·n)``: the ``low`` fraction nearest the centroid and the ``1 − high``
    farthest are dropped (the seed keeps the middle). Ties are broken by position, so the mask is a pure
    function of the inputs."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"filter band: need 0 <= low < high <= 1, got low={low}, high={high}")
    distances, labels = np.asarray(distances), np.asarray(labels)
    keep = np.zeros(len(distances), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        order = rows[np.lexsort((rows, distances[rows]))]
        n = len(rows)
        keep[order[int(math.floor(low * n + 1e-9)):int(math.floor(high * n + 1e-9))]] = True
    return keep
