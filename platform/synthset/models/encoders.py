"""Image encoders as plain functions: images (B, C, H, W) in [-1, 1] → features (B, F).

The generative metrics, the replication gate's cosine space and RCDM's embed stage all take their encoder
from here, so one spec ("teacher", a hub id or a local directory of a transformers image model) means the
same features everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from synthset import storage

# The embed stage's own small CNN, trained on the public split (``stages/embed.py``).
PUBLIC_CNN = "public_cnn"


def feature_extractor(spec: str, teacher=None, device: str = "cpu") -> Callable:
    """images (B, C, H, W) in [-1, 1] → features (B, F): the Teacher's ``embed`` or a transformers model.

    ``spec``: "teacher", or a hub id / local directory of a transformers image model (DINOv2, CLIP,
    ViT, ...): images are brought to RGB at the model's ``image_size`` with ImageNet normalisation;
    the features are ``get_image_features`` when the model has it, else the pooled output, else the
    CLS token.
    """
    import torch
    import torch.nn.functional as F

    if spec == "teacher":
        if teacher is None:
            raise ValueError("features: 'teacher' needs the Teacher model")
        return teacher.embed
    from transformers import AutoModel

    model = AutoModel.from_pretrained(spec).to(device).eval()
    vision = getattr(model.config, "vision_config", model.config)
    size = getattr(vision, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def embed(x):
        x = (x.to(device) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - mean) / std
        if hasattr(model, "get_image_features"):
            return model.get_image_features(pixel_values=x)
        out = model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).flatten(1)

    return embed


def check_encoder(spec: str) -> None:
    """A local encoder path must hold a transformers model (``config.json``): fail before any work."""
    if spec == PUBLIC_CNN:
        return
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", ".", "~")):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"synthesis.rcdm.embed.encoder: {path / 'config.json'} not found "
                                    f"(expected a transformers image model directory, a hub id, or '{PUBLIC_CNN}')")


def read_embeddings(uri: str) -> dict:
    """The arrays (name → numpy array) of an embed stage's ``embeddings.safetensors`` (a local path or an
    object-store URI)."""
    from safetensors.numpy import load, load_file

    if storage.is_local(uri):
        return load_file(storage.local_path(uri))
    return load(storage.read_bytes(uri))
