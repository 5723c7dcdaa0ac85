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


def array_batches(x, y: torch.Tensor, batch_size: int, seed: int, epoch: int,
                  soft: torch.Tensor | None = None, transform: Callable | None = None):
    """Seeded shuffled mini-batches of in-memory images, as (images, labels, soft or empty).

    ``x``: float tensors, or uint8 arrays with ``transform`` (e.g. ``to_unit_tensor``) turning each batch
    into the model's floats — the same values as converting everything first, a batch's worth of memory.
    """
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    empty = torch.empty(0)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        images = x[idx.numpy()] if isinstance(x, np.ndarray) else x[idx]
        yield (transform(images) if transform else images), y[idx], (soft[idx] if soft is not None else empty)


def predict_split(model: torch.nn.Module, split, size: int, batch_size: int = 512) -> np.ndarray:
    """``predict_proba`` over a prepared split (``data.prepare.PreparedSplit``), ``batch_size`` images at a
    time fitted to ``size``: the same batches as ``predict_proba`` on the whole split, a batch of memory."""
    from synthset.data.splits import to_unit_tensor

    probs = [predict_proba(model, to_unit_tensor(x), batch_size) for _, x in split.batches(batch_size, size=size)]
    return np.concatenate(probs) if probs else np.zeros((0, 0), dtype=np.float32)


def _stream_batches(data, ccfg, steps: int):
    """``epoch → batches`` of a ``ShardDataset`` through a DataLoader (``ccfg.loader_workers`` processes),
    stopping after ``steps`` batches so that every data-parallel rank takes the same number of steps."""
    import itertools

    def batches(epoch):
        data.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=ccfg.batch_size, num_workers=ccfg.loader_workers)
        yield from itertools.islice(loader, steps)

    return batches


def classifier_batches(data, ccfg, size: int, channels: int, rank: int = 0, world: int = 1):
    """(``epoch → batches`` of (float images, classes, soft labels or empty), steps per epoch, training images)
    for one data-parallel rank of a classifier recipe ``ccfg`` (``ClassifierConfig``).

    ``data``: a prepared split (``data.prepare.PreparedSplit``: real images, positions ``rank::world``) or the
    URI of a labelled shard dataset (shards dealt across ranks). A rank's share is decoded once and kept as
    uint8 at ``size`` when it fits in ``ccfg.in_memory_bytes`` (converted to float a batch at a time, the
    same batches as ever); otherwise it streams from the shards every epoch through a shuffle buffer of
    ``ccfg.shuffle_bytes``, so memory follows the batch, not the dataset.
    """
    from synthset.data.shards import ShardDataset, fitted_image, read_manifest
    from synthset.data.splits import to_unit_tensor

    image_bytes = size * size * channels
    buffer = max(256, ccfg.shuffle_bytes // max(1, image_bytes))
    shift = "none"
    if not isinstance(data, str):  # a prepared split
        rows = np.arange(len(data))[rank::world]
        if len(rows) * image_bytes <= ccfg.in_memory_bytes:
            x, y = data.read(rows, size), torch.from_numpy(data.labels[rows])
            steps = (len(x) + ccfg.batch_size - 1) // ccfg.batch_size
            return (lambda epoch: array_batches(x, y, ccfg.batch_size, ccfg.seed, epoch, transform=to_unit_tensor),
                    steps, len(data))
        dataset, n_train, shift = data.uri, len(data), data.shift
    else:
        dataset, n_train = data, read_manifest(data)["num_samples"]
    stream = ShardDataset(dataset, shuffle=True, seed=ccfg.seed, rank=rank, world_size=world, image_size=size,
                          channels=channels, buffer=buffer, shift=shift)
    if stream.consumer_count(rank, world) * image_bytes <= ccfg.in_memory_bytes:  # decode once, not every epoch
        items = [(fitted_image(s["image"], size, channels), s["cls"], s.get("soft")) for s in stream.samples()]
        xs = np.stack([i[0] for i in items])
        ys = torch.tensor([i[1] for i in items])
        soft = torch.stack([torch.from_numpy(i[2]) if i[2] is not None else torch.empty(0) for i in items])
        steps = (len(xs) + ccfg.batch_size - 1) // ccfg.batch_size
        return (lambda epoch: array_batches(xs, ys, ccfg.batch_size, ccfg.seed, epoch, soft, transform=to_unit_tensor),
                steps, n_train)
    steps = min(stream.rank_batches(r, ccfg.batch_size, ccfg.loader_workers) for r in range(world))
    return _stream_batches(stream, ccfg, steps), steps, n_train
