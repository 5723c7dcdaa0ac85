"""Classifier training and inference as plain functions (no Ray): used by Teacher and Student.

``distillation_loss`` is generative knowledge distillation as in TCKR: the Student matches the
Teacher's softened distribution, KL(softmax(log p_T / τ) ‖ softmax(z_S / τ)) · τ² (Hinton et al.
2015), computed from the stored Teacher probabilities p_T (log p_T equals the Teacher's logits up
to a constant, so softening the stored probabilities is exact).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from synthset.progress import Progress


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_teacher = torch.log(teacher_probs.clamp_min(1e-8))
    target = F.softmax(log_p_teacher / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean") * temperature ** 2


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding at -1 = black)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def fit_classifier(model: torch.nn.Module, epoch_batches: Callable[[int], Iterable[tuple]], epochs: int,
                   steps_per_epoch: int, lr: float, weight_decay: float, soft: bool, temperature: float,
                   augment: bool, seed: int, name: str = "train",
                   on_epoch: Callable[[int, dict], None] | None = None) -> list[float]:
    """Train ``model`` for ``epochs``; ``epoch_batches(epoch)`` yields (images, hard labels, soft probs).

    With ``soft`` the loss is ``distillation_loss`` on the soft probabilities, else cross-entropy
    on the hard labels. One-cycle cosine learning rate over all steps. Trains in NHWC (channels_last:
    ~20 % faster for the small CNN on CPU, docs/benchmarks.md) unless ``model`` is DDP-wrapped, and
    hands the model back in NCHW.
    """
    g = torch.Generator().manual_seed(seed)
    nhwc = not isinstance(model, torch.nn.parallel.DistributedDataParallel)  # DDP holds views of its parameters
    if nhwc:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    device = next(model.parameters()).device
    losses: list[float] = []
    progress = Progress(name, total, "steps")
    for epoch in range(epochs):
        model.train()
        epoch_losses = []
        for images, labels, probs in epoch_batches(epoch):
            images = images.to(device)
            if augment:
                images = random_shift(images, 2, g)
            if nhwc and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            if soft:
                loss = distillation_loss(logits, probs.to(device), temperature)
            else:
                loss = F.cross_entropy(logits, labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_losses.append(loss.item())
            progress.update(1, loss=float(np.mean(epoch_losses[-50:])))
        losses.extend(epoch_losses)
        if on_epoch:
            on_epoch(epoch, {"loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan")})
    if nhwc:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return losses


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities (N, classes) for float images (N, C, H, W) in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.softmax(model(images[i:i + batch_size].to(device)).float(), dim=-1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def array_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int,
                  soft: torch.Tensor | None = None):
    """Seeded shuffled mini-batches of in-memory tensors, as (images, labels, soft or empty)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    empty = torch.empty(0)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx], (soft[idx] if soft is not None else empty)
