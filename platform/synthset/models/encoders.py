"""Image encoders as plain functions: images (B, C, H, W) in [-1, 1] → features (B, F).

The generative metrics, the replication gate's cosine space and RCDM's embed stage all take their encoder
from here, so one spec ("teacher", a hub id or a local directory of a transformers image model) means the
same features everywhere.
"""

from __future__ import annotations

from typing import Callable


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
