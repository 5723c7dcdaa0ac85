"""A pixel-space diffusion network conditioned on class, source label and/or a real-image embedding.

The score network of the methods that train their own generator (CASD, seed 001; RCDM, seed 002
builds on it): a diffusers ``UNet2DModel`` built from a small arch config, wrapped so that every
condition becomes a learned vector **summed into the time embedding** (the UNet is built with
``class_embed_type="identity"``, so whatever vector it is given as ``class_labels`` is added to
the time embedding of every ResNet block):

    emb = time_mlp(positional(c_noise)) + E_class[class_labels] + E_source[source] + W · embedding + b

Conditioning interface (the ``cond`` keyword arguments, passed untouched through
``diffusion.edm``'s loss and samplers to ``ConditionalPixelUNet.forward``):

- ``class_labels``: LongTensor (B,) in 0 … num_classes-1, or ``num_classes`` itself = the *null*
  class (classifier-free guidance drops labels to it). Required when ``num_classes > 0``.
- ``source``: LongTensor (B,) in 0 … num_sources-1 (CASD: 0 real, 1 synthetic; Eq. 4–5 of the
  seed: ``e_θ2(y)``, a linear embedding of the one-hot source label, i.e. an ``nn.Embedding``).
  Required when ``num_sources > 0``; a network built without sources (DM, SDA) rejects it.
- ``embedding``: FloatTensor (B, embedding_dim), e.g. an image encoder's CLS vector of a real
  image (RCDM), projected by a ``Linear`` layer. Required when ``embedding_dim > 0``; a model may
  combine it with class labels. ``embedding_dropout`` is the caller's business (zero the rows).

Every embedding table and the projection start at zero, so an untrained condition adds nothing
and a model is a plain unconditional UNet until it learns to use its conditions.

Time: ``c_noise`` (EDM's ln(σ)/4, ``diffusion.edm.EDMDenoiser``) goes to the UNet's *positional*
(sinusoidal) timestep embedding, as in EDM's own networks. Not the Fourier one: diffusers'
``GaussianFourierProjection`` takes ``log`` of its input, which is negative here.

The model is a diffusers ``ModelMixin``: ``save_pretrained`` writes ``config.json`` and
safetensors weights, ``ConditionalPixelUNet.from_pretrained(dir)`` loads them; ``build_pixel_unet``
makes one from a ``config.PixelUNetArch``. ``pixel_unet_from_state`` rebuilds one from a
checkpoint's config dict and state dict (``diffusion.generator_training``).

    net = build_pixel_unet(cfg.generator.arch, image_size=32, channels=1, num_classes=10, num_sources=2)
    out = net(x, c_noise, class_labels=y, source=torch.zeros_like(y))    # tensor shaped like x
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn


class ConditionalPixelUNet(ModelMixin, ConfigMixin):
    """``UNet2DModel`` + learned class / source / embedding vectors added to its time embedding.

    sample_size, in_channels: the images' size and channels (output has the same channels).
    block_out_channels, layers_per_block, attention_levels (UNet levels, 0 = full resolution, with
    self-attention blocks), attention_head_dim, norm_num_groups, dropout: the UNet's architecture.
    num_classes: classes (0: no class conditioning); one extra row is the null class.
    num_sources: source labels (0: none; CASD: 2). embedding_dim: size of the embedding vector
    condition (0: none).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 1, block_out_channels: tuple = (32, 64, 64),
                 layers_per_block: int = 1, attention_levels: tuple = (2,), attention_head_dim: int = 8,
                 norm_num_groups: int = 8, dropout: float = 0.0, num_classes: int = 0, num_sources: int = 0,
                 embedding_dim: int = 0):
        super().__init__()
        levels = len(block_out_channels)
        bad = [i for i in attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"attention_levels: {bad} outside 0..{levels - 1}")
        down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(levels)))
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
            down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, dropout=dropout, resnet_time_scale_shift="scale_shift",
            class_embed_type="identity")
        width = block_out_channels[0] * 4  # UNet2DModel's time-embedding width
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.source_embed = nn.Embedding(num_sources, width) if num_sources else None
        self.embedding_proj = nn.Linear(embedding_dim, width) if embedding_dim else None
        for module in (self.class_embed, self.source_embed, self.embedding_proj):
            if module is not None:  # zero at start: a condition adds nothing until it is learned
                for p in module.parameters():
                    nn.init.zeros_(p)

    @property
    def null_class(self) -> int:
        """The class index that means "no class" (classifier-free guidance)."""
        return self.config.num_classes

    def condition_vector(self, batch: int, class_labels: torch.Tensor | None = None,
                         source: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, width) sum of the condition vectors (see the module docstring), checked against the config."""
        c = self.config
        width = c.block_out_channels[0] * 4
        out = torch.zeros(batch, width, device=self.device, dtype=self.dtype)
        for name, value, module in (("class_labels", class_labels, self.class_embed),
                                    ("source", source, self.source_embed),
                                    ("embedding", embedding, self.embedding_proj)):
            if module is None:
                if value is not None:
                    raise ValueError(f"ConditionalPixelUNet: got {name}, but the model was built without it")
                continue
            if value is None:
                raise ValueError(f"ConditionalPixelUNet: {name} is required (the model is conditioned on it)")
            if value.shape[0] != batch:
                raise ValueError(f"ConditionalPixelUNet: {name} has {value.shape[0]} rows for a batch of {batch}")
            if name == "embedding":
                out = out + module(value.to(self.device, self.dtype))
            else:
                out = out + module(value.to(self.device, torch.long))
        return out

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                source: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """F(x; c_noise, cond): a tensor shaped like ``x`` (float32 out whatever the model's dtype)."""
        cond = self.condition_vector(x.shape[0], class_labels, source, embedding)
        c_noise = torch.as_tensor(c_noise, device=x.device).float().reshape(-1).expand(x.shape[0])
        out = self.unet(x.to(self.dtype), c_noise, class_labels=cond).sample
        return out.float()


def build_pixel_unet(arch, image_size: int, channels: int, num_classes: int = 0, num_sources: int = 0,
                     embedding_dim: int = 0, seed: int = 0) -> ConditionalPixelUNet:
    """A ``ConditionalPixelUNet`` from a ``config.PixelUNetArch`` (or its dict), initialised from ``seed``."""
    a = arch if isinstance(arch, dict) else arch.model_dump()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG state left as it was
        torch.manual_seed(seed)
        return ConditionalPixelUNet(sample_size=image_size, in_channels=channels,
                                    block_out_channels=tuple(a["channels"]), layers_per_block=a["layers_per_block"],
                                    attention_levels=tuple(a["attention_levels"]),
                                    attention_head_dim=a["attention_head_dim"], norm_num_groups=a["norm_groups"],
                                    dropout=a["dropout"], num_classes=num_classes, num_sources=num_sources,
                                    embedding_dim=embedding_dim)


def pixel_unet_from_state(config: dict, state: dict[str, torch.Tensor]) -> ConditionalPixelUNet:
    """A ``ConditionalPixelUNet`` with ``config`` (its ``config`` dict) and weights ``state`` (strict)."""
    net = ConditionalPixelUNet.from_config(dict(config))
    net.load_state_dict(state, strict=True)
    return net
