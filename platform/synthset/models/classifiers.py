"""Classifiers for Teacher and Student: a small in-house CNN, or a transformers ResNet.

``build_classifier(cfg, num_classes, in_channels)`` returns a ``torch.nn.Module`` mapping images
(N, C, H, W) in [-1, 1] to logits. ``arch: resnet`` builds ``ResNetForImageClassification`` from a
config, or loads ``cfg.pretrained`` (hub id or directory) with a fresh head. Weights are saved
and loaded as safetensors only (``save_classifier`` / ``load_classifier``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthset.config import ClassifierConfig


class SmallCNN(nn.Module):
    """Three conv stages (w, 2w, 4w channels) with pooling, global average pool, linear head."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the default feature space for generative metrics)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class HFResNet(nn.Module):
    """transformers' ResNetForImageClassification behind the same (x → logits) interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.resnet(x).pooler_output.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class InputBlur(nn.Module):
    """A fixed, separable Gaussian low-pass (σ pixels, edge padding) in front of ``model``: part of the model, so
    it filters training and test images alike. Its kernel is rebuilt from the config, not stored with the weights."""

    def __init__(self, model: nn.Module, sigma: float, channels: int):
        super().__init__()
        self.model, self.channels = model, channels
        radius = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1),
                             persistent=False)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        r = self.kernel.shape[-1] // 2
        k = self.kernel.to(x.dtype)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=self.channels)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2), groups=self.channels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self.blur(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.blur(x))


def build_classifier(cfg: ClassifierConfig, num_classes: int, in_channels: int = 1) -> nn.Module:
    model = _build_backbone(cfg, num_classes, in_channels)
    return InputBlur(model, cfg.input_blur, in_channels) if cfg.input_blur else model


def _build_backbone(cfg: ClassifierConfig, num_classes: int, in_channels: int) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.arch == "cnn":
        return SmallCNN(num_classes, in_channels, cfg.width)
    from transformers import ResNetConfig, ResNetForImageClassification

    if cfg.pretrained:
        model = ResNetForImageClassification.from_pretrained(
            cfg.pretrained, num_labels=num_classes, ignore_mismatched_sizes=True, use_safetensors=True)
        if model.config.num_channels != in_channels:
            raise ValueError(f"{cfg.pretrained}: expects {model.config.num_channels}-channel images, "
                             f"data has {in_channels}")
        return HFResNet(model)
    w = cfg.width
    config = ResNetConfig(num_channels=in_channels, embedding_size=w, hidden_sizes=[w, 2 * w, 4 * w],
                          depths=[1, 1, 1], layer_type="basic", num_labels=num_classes, downsample_in_first_stage=False)
    return HFResNet(ResNetForImageClassification(config))


def save_classifier(model: nn.Module, directory: str | Path, cfg: ClassifierConfig, num_classes: int,
                    in_channels: int, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    meta = {"config": cfg.model_dump(mode="json"), "num_classes": num_classes, "in_channels": in_channels, **(extra or {})}
    (directory / "classifier.json").write_text(json.dumps(meta, indent=1))


def classifier_channels(directory: str | Path) -> int:
    """How many channels the classifier saved in ``directory`` reads (its ``classifier.json``)."""
    meta_path = Path(directory) / "classifier.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no classifier here")
    return int(json.loads(meta_path.read_text())["in_channels"])


def load_classifier(directory: str | Path, device: str = "cpu") -> nn.Module:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "classifier.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no classifier here")
    meta = json.loads(meta_path.read_text())
    cfg = ClassifierConfig.model_validate({k: v for k, v in meta["config"].items() if k in ClassifierConfig.model_fields})
    cfg = cfg.model_copy(update={"pretrained": None})  # weights come from the safetensors file below
    model = build_classifier(cfg, meta["num_classes"], meta["in_channels"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.to(device).eval()
