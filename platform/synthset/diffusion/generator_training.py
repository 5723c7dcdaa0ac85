"""Training a method's own pixel-space diffusion model (CASD's EDM model, RCDM's DDPM denoiser): plain
functions, then a Ray Train driver.

The algorithm (no Ray; tests/diffusion/test_generator_training.py, tests/methods/test_rcdm.py):

- ``TrainingSet``: images in [-1, 1] (N, C, H, W) with their conditions (``class_labels``; CASD's
  ``source``, 0 real / 1 synthetic; RCDM's ``embeddings``, an encoder's vector of each image). CASD's
  loss (Eq. 5 of seed 001) is the mean over the union of real and synthetic samples, so a step draws
  its batch uniformly from the whole set.
- ``Objective``: what the network is and what it learns, as plain functions: how to build it from
  its config, a step's noise levels, the per-sample loss, a sample grid. ``EDM`` (here; CASD) and
  ``diffusion.rcdm.DDPM`` (RCDM) are the two; everything else below is shared.
- ``step_draws(seed, step, …)``: everything random in step ``step`` (which samples, their noise
  levels, their noise, which class labels drop to the null class) from one generator seeded by
  (seed, step). No stream is carried from step to step, so a run resumed at step k draws exactly
  what an unbroken run draws, and a worker computing any share of a step draws the same numbers.
- ``edm_loss_at``: EDM's per-sample loss λ(σ)‖D(y + σn; σ) − y‖² (``diffusion.edm``, Eq. 2 and
  Table 1) with σ and n given, so that they can be drawn for the whole step and shared out.
- ``TrainState`` / ``train_steps``: Adam with a linear warm-up and, for RCDM, a cosine decay (the
  learning rate is a function of the step, not of a scheduler's state), gradient clipping, EMA of
  the weights (the EDM code's practice; sampling uses the EMA). With ``data_parallel=(rank, world)`` inside a
  ``torch.distributed`` group, each rank computes the loss of its share of the step's batch
  (positions ``rank::world``, each divided by the *whole* batch size) and the gradients are
  summed: one process's step, split.
- ``save_checkpoint`` / ``load_checkpoint``: the weights, the EMA, Adam's moments as safetensors
  files plus ``state.json`` (step, loss history, the network's config). Nothing is pickled.
  Restoring a checkpoint restores the whole state, so resuming gives the same weights as never
  stopping (bit for bit on one process; ``tests/diffusion/test_generator_training.py``).

The Ray layer (``fit_generator``): a ``TorchTrainer`` (gloo on CPU, NCCL on GPU; bf16 autocast on
GPU only) whose workers run ``train_steps`` between checkpoints, report each checkpoint directory
through ``ray.train.report(checkpoint=…)`` and, on a restart, load ``ray.train.get_checkpoint()``.
Ray Train V2 restores a run's checkpoint list from ``<storage_path>/<name>`` when a new driver
starts the same run, so rerunning a killed stage continues from its last checkpoint; a worker
that dies is restarted from it within the same ``fit`` (``FailureConfig.max_failures``).

    state = new_state(build_pixel_unet(arch, 32, 1, num_classes=10, num_sources=2), lr=2e-4)
    losses = train_steps(state, data, settings, stop=400)  # EDM: CASD
    # RCDM: new_state(diffusion.rcdm.build_denoiser(arch)), a TrainingSet with embeddings, objective=rcdm.DDPM
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from synthset.diffusion.edm import EDMDenoiser, loss_weight, sample_training_sigmas
from synthset.diffusion.schedules import ema_decay_at, lr_at


@dataclass
class TrainingSet:
    """What the generator trains on: ``images`` float (N, C, H, W) in [-1, 1], or uint8 (N, C, H, W) pixels that
    become those floats a batch at a time (a quarter of the memory in every worker); ``class_labels`` long (N,);
    ``source`` long (N,) or None (a network without a source label); ``embeddings`` float (N, D) or None
    (a network not conditioned on an embedding of the image)."""

    images: torch.Tensor
    class_labels: torch.Tensor
    source: torch.Tensor | None = None
    num_classes: int = 0
    embeddings: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or n == 0:
            raise ValueError(f"TrainingSet: images must be a non-empty (N, C, H, W) tensor, got {tuple(self.images.shape)}")
        for name in ("class_labels", "source"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"TrainingSet: {name} has shape {tuple(value.shape)}, expected ({n},)")
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) != n):
            raise ValueError(f"TrainingSet: embeddings has shape {tuple(self.embeddings.shape)}, expected ({n}, D)")

    @property
    def num_sources(self) -> int:
        return 0 if self.source is None else int(self.source.max()) + 1

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.contiguous(), "class_labels": self.class_labels.contiguous()}
        if self.source is not None:
            out["source"] = self.source.contiguous()
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings.contiguous()
        return out


def save_training_set(path: str, data: TrainingSet) -> None:
    """``data`` as one safetensors file (what the Ray workers read)."""
    from safetensors.torch import save_file

    save_file(data.tensors(), path, metadata={"num_classes": str(data.num_classes)})


def load_training_set(path: str) -> TrainingSet:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return TrainingSet(tensors["images"], tensors["class_labels"], tensors.get("source"),
                       int(meta.get("num_classes", 0)), tensors.get("embeddings"))


@dataclass
class TrainSettings:
    """The training recipe (``config.DiffusionTrainConfig`` minus where it runs). ``decay_steps``: the learning
    rate decays by a half cosine to zero over this many steps (RCDM); None: constant after the warm-up (CASD)."""

    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 50
    ema_decay: float | None = 0.999
    class_dropout: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    decay_steps: int | None = None

    @classmethod
    def from_config(cls, train) -> "TrainSettings":
        return cls(train.batch_size, train.lr, train.warmup_steps, train.ema_decay, train.class_dropout,
                   train.max_grad_norm, train.seed)


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s generator (63 bits of sha256 of (seed, step))."""
    digest = hashlib.sha256(f"synthset-generator-step:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_draws(seed: int, step: int, n: int, batch_size: int, image_shape: tuple[int, ...],
               class_dropout: float = 0.0, draw_levels: Callable | None = None) -> dict[str, torch.Tensor]:
    """Step ``step``'s random draws, in a fixed order from one CPU generator: ``index`` (B,) uniform over the
    n training images (with replacement), ``level`` (B,): ``draw_levels(B, generator)``, by default EDM's σ
    with ln σ ~ N(P_mean, P_std²) (Table 1), ``noise`` (B, *image_shape) standard normal, ``drop`` (B,) bool:
    class label replaced by the null class."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    index = torch.randint(0, n, (batch_size,), generator=g)
    level = (draw_levels or sample_training_sigmas)(batch_size, g)
    noise = torch.randn((batch_size, *image_shape), generator=g)
    drop = torch.rand(batch_size, generator=g) < class_dropout
    return {"index": index, "level": level, "noise": noise, "drop": drop}


def edm_loss_at(denoiser, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, **cond) -> torch.Tensor:
    """Per-sample EDM loss (B,) with σ (B,) and standard-normal ``noise`` given: λ(σ)·mean((D(y + σn; σ) − y)²),
    ``diffusion.edm.edm_loss`` without its own draws."""
    sigma_b = sigma.reshape(-1, *[1] * (images.ndim - 1))
    denoised = denoiser(images + sigma_b * noise, sigma, **cond)
    return (loss_weight(sigma_b, denoiser.sigma_data) * (denoised - images) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class Objective:
    """What a generator is and what it learns, as four module-level functions (Ray pickles them by reference):

    - ``build(network_config)``: the network (its weights come from the initial file or a checkpoint);
    - ``draw_levels(network, batch_size, generator)``: a step's noise levels (EDM: σ; DDPM: timesteps t),
      drawn in ``step_draws``'s fixed order;
    - ``loss(network)``: a function ``(images, levels, noise, **cond)`` → per-sample loss (B,), its
      preconditioning or noise schedule built once;
    - ``sample_grid(network, data, device)``: (uint8 images, class ids), a few samples per class.

    ``network_config`` is what ``save_checkpoint`` records as the network's ``config``.
    """

    build: Callable[[dict], torch.nn.Module]
    draw_levels: Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor]
    loss: Callable[[torch.nn.Module], Callable[..., torch.Tensor]]
    sample_grid: Callable[[torch.nn.Module, TrainingSet, Any], tuple[np.ndarray, np.ndarray]]


def _pixel_unet(network_config: dict) -> torch.nn.Module:
    from synthset.diffusion.pixel_unet import ConditionalPixelUNet

    return ConditionalPixelUNet.from_config(network_config)


def _edm_levels(net, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return sample_training_sigmas(batch_size, generator)


def _edm_loss(net):
    return functools.partial(edm_loss_at, EDMDenoiser(net))


def _edm_grid(net, data: TrainingSet, device) -> tuple[np.ndarray, np.ndarray]:
    return sample_grid_images(net, data.num_classes, 4, device=str(device))


@dataclass
class TrainState:
    """The network, its EMA copy (None without EMA), Adam, and the number of steps done."""

    net: torch.nn.Module
    ema: dict[str, torch.Tensor] | None
    opt: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The weights sampling uses: the EMA, or the raw weights without one."""
        return {k: v.detach().clone() for k, v in (self.ema or self.net.state_dict()).items()}


def new_state(net: torch.nn.Module, lr: float = 2e-4, ema: bool = True) -> TrainState:
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ema_weights = {k: v.detach().clone().float() for k, v in net.state_dict().items()} if ema else None
    return TrainState(net, ema_weights, opt)


def _cond(data: TrainingSet, index: torch.Tensor, drop: torch.Tensor, null_class: int, device) -> dict:
    """The conditions of the images at ``index``, by the names the networks take: ``class_labels`` (``drop``
    ones replaced by the null class), ``source``, ``embedding``."""
    cond = {}
    if data.num_classes:
        labels = data.class_labels[index].clone()
        labels[drop] = null_class
        cond["class_labels"] = labels.to(device)
    if data.source is not None:
        cond["source"] = data.source[index].to(device)
    if data.embeddings is not None:
        cond["embedding"] = data.embeddings[index].to(device)
    return cond


def train_steps(state: TrainState, data: TrainingSet, settings: TrainSettings, stop: int,
                data_parallel: tuple[int, int] | None = None, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None, objective: Objective | None = None) -> list[float]:
    """Run steps ``state.step … stop-1`` in place; returns their losses (mean over each step's whole batch).

    ``data``: the training set (CPU tensors; each step's share moves to ``device``). ``settings``: the
    recipe. ``data_parallel=(rank, world_size)`` in an initialised ``torch.distributed`` group: this
    rank's share of every step, gradients summed over ranks (see the module docstring).
    ``autocast_dtype``: mixed precision for the forward pass (bf16 on GPU); None: full precision.
    ``objective``: the network's levels and loss (default ``EDM``).
    """
    rank, world = data_parallel or (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"train_steps: data_parallel={data_parallel} is not (rank, world_size)")
    if settings.batch_size < world:
        raise ValueError(f"batch_size ({settings.batch_size}) is smaller than the {world} workers sharing it")
    net, objective = state.net, objective or EDM
    loss_at = objective.loss(net)
    draw_levels = functools.partial(objective.draw_levels, net)
    params = [p for p in net.parameters() if p.requires_grad]
    null_class = data.num_classes
    shape = tuple(data.images.shape[1:])
    mine = torch.arange(rank, settings.batch_size, world)
    out = []
    net.train()
    for step in range(state.step, stop):
        draws = step_draws(settings.seed, step, len(data.images), settings.batch_size, shape, settings.class_dropout,
                           draw_levels)
        idx = draws["index"][mine]
        images = data.images[idx]
        if images.dtype == torch.uint8:  # to_unit_tensor's arithmetic: the same floats as converting up front
            images = images.float().div(127.5).sub(1.0)
        images = images.to(device)
        cond = _cond(data, idx, draws["drop"][mine], null_class, device)
        for group in state.opt.param_groups:
            group["lr"] = lr_at(step, settings.lr, settings.warmup_steps, settings.decay_steps)
        torch.manual_seed((step_seed(settings.seed, step) + rank) % (1 << 63))  # dropout masks: resumable too
        state.opt.zero_grad(set_to_none=False)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            per_sample = loss_at(images, draws["level"][mine].to(device), draws["noise"][mine].to(device), **cond)
        loss = per_sample.float().sum() / settings.batch_size  # this rank's part of the whole batch's mean
        loss.backward()
        total = loss.detach().reshape(1)
        if world > 1:
            import torch.distributed as dist

            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads] + [total])
            dist.all_reduce(flat)  # sum: the gradient of the whole step's batch
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            total = flat[-1:]
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        state.opt.step()
        if state.ema is not None:
            decay = ema_decay_at(step, settings.ema_decay)
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if v.dtype.is_floating_point:
                        state.ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
                    else:
                        state.ema[k].copy_(v)
        state.step = step + 1
        out.append(float(total))
        state.losses.append(out[-1])
    return out


# ---- checkpoints: safetensors + state.json, nothing pickled ----

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{pid}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def save_checkpoint(directory: str, state: TrainState, meta: dict | None = None) -> None:
    """Write ``state`` into ``directory``: ``model.safetensors``, ``ema.safetensors`` (if any),
    ``optimizer.safetensors`` and ``state.json`` (step, losses, optimizer groups, the network's config, ``meta``)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.net.state_dict().items()},
              os.path.join(directory, "model.safetensors"))
    if state.ema is not None:
        save_file({k: v.contiguous() for k, v in state.ema.items()}, os.path.join(directory, "ema.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(state.opt)
    save_file(opt_tensors, os.path.join(directory, "optimizer.safetensors"))
    config = dict(getattr(state.net, "config", {}) or {})
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"step": state.step, "losses": state.losses, "optimizer": opt_meta,
                   "network_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
                                      if not k.startswith("_")},
                   **(meta or {})}, f)


def read_checkpoint_state(directory: str) -> dict:
    with open(os.path.join(directory, "state.json")) as f:
        return json.load(f)


def load_checkpoint(directory: str, state: TrainState) -> dict:
    """Restore ``state`` (same network shape, fresh optimizer) from ``directory``; returns ``state.json``."""
    from safetensors.torch import load_file

    info = read_checkpoint_state(directory)
    state.net.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
    ema_path = os.path.join(directory, "ema.safetensors")
    if state.ema is not None:
        if not os.path.exists(ema_path):
            raise ValueError(f"{directory}: no ema.safetensors, but the run keeps an EMA")
        state.ema = {k: v.float() for k, v in load_file(ema_path).items()}
    flat = load_file(os.path.join(directory, "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["optimizer"]["param_groups"]]
    state.opt.load_state_dict({"state": opt_state, "param_groups": groups})
    state.step = int(info["step"])
    state.losses = list(info["losses"])
    return info


# ---- sampling a grid (for the stage's sample grids) ----

@torch.no_grad()
def sample_grid_images(net, num_classes: int, per_class: int, num_steps: int = 18, seed: int = 12345,
                       source: int | None = 0, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of ``per_class`` EDM-Heun samples per class (source ``source``, no guidance)."""
    from synthset.diffusion.edm import heun_sample, initial_noise, karras_sigmas

    labels = torch.arange(num_classes).repeat(per_class)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    noise = initial_noise([seed + i for i in range(len(labels))], shape, device)
    cond = {"class_labels": labels.to(device)} if num_classes else {}
    if source is not None and net.config.num_sources:
        cond["source"] = torch.full((len(labels),), source, dtype=torch.long, device=device)
    x = heun_sample(EDMDenoiser(net), noise, karras_sigmas(num_steps), **cond)
    return to_uint8(x), labels.numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → uint8 (N, H, W) for one channel, (N, H, W, C) otherwise."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return arr[:, 0].numpy() if arr.shape[1] == 1 else arr.permute(0, 2, 3, 1).numpy()


# CASD's generator: a ConditionalPixelUNet trained with EDM's loss, sampled with EDM's Heun sampler.
EDM = Objective(_pixel_unet, _edm_levels, _edm_loss, _edm_grid)


# ---- the Ray Train driver ----

def _train_loop(config: dict) -> None:
    """One Ray Train worker: build, restore the last checkpoint, train between checkpoints, report them."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["cpus_per_worker"])
    use_gpu = config["use_gpu"] and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    autocast = torch.bfloat16 if use_gpu and config["mixed_precision"] == "bf16" else None
    data = load_training_set(_local_file(config["training_set"]))
    settings = TrainSettings(**config["settings"])
    torch.manual_seed(settings.seed)
    objective = config["objective"]
    net = objective.build(config["network_config"]).to(device)
    net.load_state_dict(load_file_cpu(_local_file(config["init_weights"])))  # the same start on every rank
    state = new_state(net, settings.lr, ema=settings.ema_decay is not None)
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(directory, state)
        resumed_from = state.step
        if rank == 0:
            print(f"[generator] resumed from the checkpoint at step {resumed_from}")
    steps, every, crash = config["steps"], config["checkpoint_every"], config.get("crash_at_step")
    samples_every = config.get("sample_every")
    t0, first = time.time(), state.step
    while state.step < steps:
        stop = min(steps, (state.step // every + 1) * every)
        if crash is not None and rank == world - 1 and state.step < crash <= stop and resumed_from == 0:
            train_steps(state, data, settings, crash, (rank, world) if world > 1 else None, device, autocast, objective)
            _wait_for_snapshot(config["snapshot"])
            os._exit(1)  # a test's stand-in for a killed worker/node: no cleanup, no report
        losses = train_steps(state, data, settings, stop, (rank, world) if world > 1 else None, device, autocast,
                             objective)
        seconds = time.time() - t0
        metrics = {"step": state.step, "loss": float(np.mean(losses)), "resumed_from": resumed_from,
                   "steps_per_s": (state.step - first) / seconds if seconds > 0 else 0.0}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, state, {"resumed_from": resumed_from, "seconds": seconds})
                if samples_every and (state.step % samples_every == 0 or state.step == steps):
                    _save_grid(state, data, config, device)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if rank == 0:
            print(f"[generator] step {state.step}/{steps}: loss {metrics['loss']:.4f}, "
                  f"{metrics['steps_per_s']:.2f} steps/s")


def _wait_for_snapshot(path: str, timeout: float = 60.0) -> None:
    """Test hook only: wait until Ray Train has recorded a checkpoint (its run snapshot exists), so that a
    crash right after a report does not race the controller's collection of that report."""
    t0 = time.time()
    while not os.path.exists(path) and time.time() - t0 < timeout:
        time.sleep(0.2)


def _local_file(uri: str) -> str:
    """A local path of the file ``uri`` (a copy in a temporary directory when it is remote)."""
    import tempfile

    from synthset import storage

    if storage.is_local(uri):
        return storage.local_path(uri)
    path = os.path.join(tempfile.mkdtemp(prefix="generator-"), os.path.basename(uri))
    with open(path, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


def load_file_cpu(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _save_grid(state: TrainState, data: TrainingSet, config: dict, device) -> None:
    from synthset.plots import save_class_grid

    net = config["objective"].build(config["network_config"])
    net.load_state_dict(state.ema_state())
    net = net.to(device).eval()
    images, labels = config["objective"].sample_grid(net, data, device)
    out = os.path.join(config["grid_dir"], f"samples-step{state.step:07d}.png")
    os.makedirs(config["grid_dir"], exist_ok=True)
    save_class_grid(images, labels, config.get("class_names") or [str(c) for c in range(data.num_classes)], out, 4)


def fit_generator(network_config: dict, init_weights: str, training_set: str, settings: TrainSettings,
                  steps: int, storage_path: str, name: str, workers: int = 1, cpus_per_worker: int = 1,
                  use_gpu: bool = False, mixed_precision: str = "bf16", checkpoint_every: int = 100,
                  sample_every: int | None = None, grid_dir: str | None = None, class_names: list[str] | None = None,
                  max_failures: int = 2, crash_at_step: int | None = None, objective: Objective | None = None) -> dict:
    """Train with a ``TorchTrainer`` of ``workers`` workers; returns the last checkpoint's ``state.json``,
    with ``checkpoint`` (its directory) added.

    ``objective``: the network and its loss (default ``EDM``); ``network_config``: what its ``build`` takes
    (a ``ConditionalPixelUNet`` config for EDM); ``init_weights``: its initial weights
    (a safetensors file or URI; every rank starts from them); ``training_set``: a ``save_training_set``
    file or URI (each worker reads it). ``checkpoint`` in the result is a local copy of the last one. Ray Train
    keeps the run under ``storage_path/name``: a driver started again with the same two continues from
    the last checkpoint. ``crash_at_step``: for tests, the last worker exits its process (as a kill
    would) on reaching this step in a run that did not resume.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"network_config": dict(network_config), "init_weights": init_weights,
                           "training_set": training_set, "settings": settings.__dict__, "steps": steps,
                           "checkpoint_every": checkpoint_every, "cpus_per_worker": cpus_per_worker,
                           "use_gpu": use_gpu, "mixed_precision": mixed_precision, "sample_every": sample_every,
                           "grid_dir": grid_dir, "class_names": class_names, "crash_at_step": crash_at_step,
                           "snapshot": os.path.join(storage_path, name, "checkpoint_manager_snapshot.json"),
                           "objective": objective or EDM},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"generator training {name}: no checkpoint was reported")
    import shutil
    import tempfile

    local = os.path.join(tempfile.mkdtemp(prefix="generator-checkpoint-"), "checkpoint")
    with result.checkpoint.as_directory() as directory:  # local, or downloaded from remote storage
        shutil.copytree(directory, local)
    return {**read_checkpoint_state(local), "checkpoint": local, "checkpoint_uri": result.checkpoint.path}
