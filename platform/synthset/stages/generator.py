"""Generator stage of CASD (and its DM / SDA baselines): train the pixel-space diffusion model with Ray Train.

    python jobs/train_generator.py --config conf/casd.yaml [--set synthesis.casd.variant=sda]

The training set is the private split (source 0; ``synthesis.casd.real_images``: a seeded,
class-balanced subset) and, for ``variant`` casd and sda, a synthetic pool (source 1): an
existing synthset dataset (``pool.path``) or one generated first by another method under this
config (``pool.method``, e.g. ClassPrompt; its stages and synthesis stage run and are cached as
for any run of that method). ``pool.mismatch`` degrades the pool for the robustness experiment.
The network (``diffusion.pixel_unet``) gets class labels always, the source label only for casd.
Training is ``diffusion.generator_training.fit_generator``: a ``TorchTrainer`` with
``synthesis.casd.train.workers`` workers, checkpoints as safetensors every ``checkpoint_every`` steps;
a stage killed part-way resumes from its last checkpoint when rerun (Ray Train V2 restores the run
``generator-<hash>`` under ``<stage>/ray``).

Writes ``<output.root>/generator/<hash>/``: ``model/`` (the EMA weights, ``save_pretrained``:
``config.json`` + safetensors; what synthesis loads), ``training_set.safetensors``,
``loss.png``, ``samples.png`` (a grid per class at source 0) and ``_SUCCESS.json`` last. The hash
covers ``data`` and ``synthesis.casd`` plus the pool's identity: the sha256 of ``manifest.json`` of
a ``pool.path`` dataset, or the synthesis stage hash of a ``pool.method`` pool (which fixes its
contents). Stages after synthesis hash the config only: a ``pool.path`` whose contents change in
place changes this stage's directory but not theirs (rerun them with ``--no-resume``).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from synthset import storage
from synthset.config import Config, stage_hash
from synthset.methods.casd import check_pool, uses_pool
from synthset.stages.common import StageDir, output_root

STAGE = "casd_generator"  # its STAGE_INPUTS key; the directory is <output.root>/generator/<hash>
_POOL_STREAM = 0xCA5D  # seeds the pool subset, the real subset and the corruption apart from other draws


def pool_config(cfg: Config) -> Config:
    """The config whose synthesis stage is the pool of ``pool.method``: this one with that method and the
    pool's synthesis settings (so it shares its cache with a plain run of that method)."""
    pool = cfg.synthesis.casd.pool
    d = cfg.to_dict()
    d["synthesis"] = {**d["synthesis"], "method": pool.method, "images_per_class": pool.images_per_class,
                      "num_inference_steps": pool.num_inference_steps, "guidance_scale": pool.guidance_scale}
    return Config.model_validate(d)


def pool_method_config(cfg: Config) -> Config | None:
    """The config of the generation this stage reads as its pool (``pool.method``), or None: the graph's
    ``upstream`` of this stage (``stages/graph.py`` runs it first and hands it over as ``done["pool"]``)."""
    return pool_config(cfg) if uses_pool(cfg) and cfg.synthesis.casd.pool.method is not None else None


def pool_identity(cfg: Config) -> dict | None:
    """What fixes the pool's contents (see the module docstring); None when the variant reads no pool."""
    if not uses_pool(cfg):
        return None
    check_pool(cfg)
    pool = cfg.synthesis.casd.pool
    if pool.path is not None:
        manifest = storage.read_bytes(storage.join(pool.path, "manifest.json"))
        return {"manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    return {"method": pool.method, "synthesis": stage_hash(pool_config(cfg), "synthesis")}


def generator_dir(cfg: Config) -> StageDir:
    hashed = cfg
    if not uses_pool(cfg):  # DM reads no pool: its settings do not name the model
        d = cfg.to_dict()
        d["synthesis"]["casd"]["pool"] = {}
        hashed = Config.model_validate(d)
    h = stage_hash(hashed, STAGE, extra=pool_identity(cfg))
    out = StageDir(STAGE, h, storage.join(output_root(cfg), "generator", h))
    out.check_within(cfg)
    return out


def _balanced_subset(labels: np.ndarray, total: int | None, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``total`` images, as equal per class as the classes allow (all when None)."""
    if total is None or total >= len(labels):
        return np.arange(len(labels))
    chosen, left = [], total
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    k = 0
    while left > 0:  # round-robin over classes: class-balanced prefixes
        progressed = False
        for m in members:
            if k < len(m) and left > 0:
                chosen.append(m[k])
                left -= 1
                progressed = True
        if not progressed:
            break
        k += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def corrupt(images, seed: int):
    """The ``corrupt`` mismatch: 4x box down- then up-sampling, plus Gaussian noise of std 0.3, clipped to [-1, 1]."""
    import torch
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    small = F.avg_pool2d(images, 4, ceil_mode=True)
    blocky = F.interpolate(small, size=(h, w), mode="nearest")
    g = torch.Generator().manual_seed(seed)
    return (blocky + 0.3 * torch.randn(images.shape, generator=g)).clamp(-1, 1)


def read_pool(dataset: str, class_names: list[str], image_size: int, channels: int):
    """(images in [-1, 1] as (N, C, H, W), class ids) of a synthset dataset, fitted to the private data's size and
    channels; its class names must be the private split's."""
    import torch

    from synthset.data.shards import image_to_tensor, iter_shard, read_manifest

    manifest = read_manifest(dataset)
    if manifest.get("class_names") != class_names:
        raise ValueError(f"synthesis.casd.pool: {dataset} has classes {manifest.get('class_names')}, the private "
                         f"split {class_names}")
    images, labels = [], []
    for shard in manifest["shards"]:
        for s in iter_shard(storage.join(dataset, shard["shard"])):
            images.append(image_to_tensor(s["image"], image_size, channels))
            labels.append(int(s["cls"]))
    return torch.stack(images), np.asarray(labels, dtype=np.int64)


def training_set(cfg: Config, pool_dataset: str | None):
    """The generator's ``TrainingSet``: private images (source 0) and the pool (source 1) by the variant."""
    import torch

    from synthset.data.splits import to_unit_tensor
    from synthset.diffusion.generator_training import TrainingSet
    from synthset.stages.prepare import load_splits

    casd = cfg.synthesis.casd
    splits = load_splits(cfg)
    names, private = splits.class_names, splits.private
    rng = np.random.default_rng([casd.train.seed, _POOL_STREAM])
    keep = _balanced_subset(private.labels, casd.real_images, len(names), rng)
    real = to_unit_tensor(private.read(keep, cfg.data.image_size))
    real_labels = private.labels[keep].astype(np.int64)
    images, labels, source = [real], [real_labels], [np.zeros(len(keep), np.int64)]
    pool_count = 0
    if uses_pool(cfg):
        x, y = read_pool(pool_dataset, names, cfg.data.image_size, real.shape[1])
        take = np.sort(rng.permutation(len(y))[:casd.pool.size]) if casd.pool.size else np.arange(len(y))
        x, y = x[torch.as_tensor(take)], y[take]
        if casd.pool.mismatch == "other_classes":
            y = (y + 1) % len(names)
        elif casd.pool.mismatch == "corrupt":
            x = corrupt(x, int(rng.integers(1 << 62)))
        images.append(x)
        labels.append(y)
        source.append(np.ones(len(y), np.int64))
        pool_count = len(y)
    data = TrainingSet(torch.cat(images), torch.from_numpy(np.concatenate(labels)),
                       torch.from_numpy(np.concatenate(source)) if casd.variant == "casd" else None, len(names))
    return data, {"real_images": int(len(keep)), "pool_images": pool_count}


def _ray_storage(stage: StageDir) -> str:
    """Where Ray Train keeps the run: ``<stage>/ray``, on local disk and in an object store alike, so that
    ``--no-resume``, which empties it, leaves the stage's config and lease alone."""
    return stage.path("ray")


def train_in_stage(stage: StageDir, net, data, settings, train, class_names: list[str], resume: bool,
                   objective=None) -> tuple[object, dict, dict, str]:
    """Train ``net`` (its initial weights) on ``data`` with ``fit_generator`` into ``stage``: CASD's generator and
    RCDM's denoiser both train through here. Returns (the network with the final EMA weights, the last
    checkpoint's ``state.json``, metrics, the local stage directory).

    ``train``: a ``config.DiffusionTrainConfig`` (where and how often it runs; ``settings`` is its recipe);
    ``objective``: ``generator_training.Objective`` (default EDM). Writes ``training_set.safetensors`` and
    ``init.safetensors`` (what every worker reads) and, with ``train.sample_every``, ``grids/``. Ray Train keeps
    the run as ``generator-<hash>`` under ``<stage>/ray``: a rerun continues from its last checkpoint, unless
    ``resume`` is False (the old run is deleted first)."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from synthset.diffusion.generator_training import EDM, fit_generator, read_checkpoint_state, save_training_set

    objective = objective or EDM
    if not resume and storage.exists(_ray_storage(stage)):  # --no-resume: Ray Train must not restore the old run
        storage.delete_dir_contents(_ray_storage(stage))
    local = storage.local_path(stage.uri) if storage.is_local(stage.uri) else tempfile.mkdtemp(prefix="generator-")
    os.makedirs(local, exist_ok=True)
    save_training_set(os.path.join(local, "training_set.safetensors"), data)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(local, "init.safetensors"))
    if not storage.is_local(stage.uri):
        storage.upload_dir(local, stage.uri)
    t0 = time.time()
    result = fit_generator(
        dict(net.config), stage.path("init.safetensors"), stage.path("training_set.safetensors"), settings,
        train.steps, _ray_storage(stage), f"generator-{stage.hash}", train.workers, train.cpus_per_worker,
        train.use_gpu, train.mixed_precision, train.checkpoint_every, train.sample_every,
        os.path.join(local, "grids") if storage.is_local(stage.uri) else None, class_names, objective=objective)
    seconds = time.time() - t0
    checkpoint = result["checkpoint"]  # a local copy of the last checkpoint
    ema = os.path.join(checkpoint, "ema.safetensors")
    final = objective.build(dict(net.config))
    final.load_state_dict(load_file(ema if os.path.exists(ema) else os.path.join(checkpoint, "model.safetensors")))
    state = read_checkpoint_state(checkpoint)
    losses = state["losses"]
    trained_now = state["step"] - state.get("resumed_from", 0)
    metrics = {"steps": state["step"], "resumed_from": state.get("resumed_from", 0),
               "steps_per_s": trained_now / state["seconds"] if state.get("seconds") else 0.0,
               "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])), "seconds": seconds}
    return final, state, metrics, local


def grid_files(local: str) -> list[str]:
    """The sample grids training saved in the stage directory ``local`` (for the tracker), in step order."""
    grids = os.path.join(local, "grids")
    return sorted(os.path.join(grids, f) for f in os.listdir(grids)) if os.path.isdir(grids) else []


def run_generator(cfg: Config, model: str | None = None, done: dict | None = None, resume: bool = True,
                  tracker=None) -> dict:
    """Train (or reuse, or resume) CASD's generator; the summary's ``model`` is what synthesis loads.

    ``model`` (the foundation model) and ``done`` are the graph's stage-runner arguments; a pool of
    ``pool.method`` was generated first by the graph (``pool_method_config``), its summary ``done["pool"]``."""
    import torch

    from synthset.diffusion.generator_training import TrainSettings, sample_grid_images
    from synthset.diffusion.pixel_unet import build_pixel_unet
    from synthset.plots import save_class_grid, save_curves
    from synthset.stages.prepare import load_splits

    check_pool(cfg)
    stage = generator_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("model"))
    casd, train = cfg.synthesis.casd, cfg.synthesis.casd.train
    names = load_splits(cfg).class_names
    pool_dataset = None
    if uses_pool(cfg):
        if casd.pool.method is not None:
            if not (done or {}).get("pool"):
                raise ValueError("synthesis.casd.pool.method: the pool is generated by the stage graph first "
                                 "(stages.graph.run_method_stages); run the generator stage through it")
            pool_dataset = done["pool"]["dataset"]
            print(f"[generator] the pool: {casd.pool.method} synthesis, {casd.pool.images_per_class} images per class "
                  f"→ {pool_dataset}")
        else:
            pool_dataset = casd.pool.path
    data, counts = training_set(cfg, pool_dataset)
    stage.begin(cfg)
    net = build_pixel_unet(casd.model, cfg.data.image_size, data.images.shape[1], num_classes=len(names),
                           num_sources=2 if casd.variant == "casd" else 0, seed=train.seed)
    print(f"[generator] {casd.variant}: {counts['real_images']} private + {counts['pool_images']} pool images "
          f"(mismatch: {casd.pool.mismatch}), {train.steps} steps of {train.batch_size} on {train.workers} "
          f"worker(s) → {stage.uri}")
    final, state, metrics, local = train_in_stage(stage, net, data, TrainSettings.from_config(train), train, names,
                                                  resume)
    final.save_pretrained(os.path.join(local, "model"), safe_serialization=True)
    save_curves({casd.variant: state["losses"]}, os.path.join(local, "loss.png"), f"{casd.variant}: EDM loss")
    torch.set_num_threads(max(1, train.cpus_per_worker))
    images, labels = sample_grid_images(final.eval(), len(names), 8, num_steps=cfg.synthesis.num_inference_steps
                                        if cfg.synthesis.num_inference_steps >= 2 else 18)
    save_class_grid(images, labels, names, os.path.join(local, "samples.png"), 8)
    if not storage.is_local(stage.uri):
        storage.upload_dir(local, stage.uri)
    metrics = {**metrics, **counts}
    summary = stage.complete({"model": stage.path("model"), "variant": casd.variant, "pool": pool_dataset,
                              "pool_identity": pool_identity(cfg), **metrics})
    if tracker is not None:
        tracker.log_stage("generator", cfg, metrics=metrics, params=casd.model_dump(mode="json"),
                          artifacts=[os.path.join(local, "samples.png"), os.path.join(local, "loss.png"),
                                     *grid_files(local)])
    print(f"[generator] {state['step']} steps ({metrics['steps_per_s']:.2f} steps/s, resumed from "
          f"{metrics['resumed_from']}), final loss {metrics['final_loss']:.4f} → {stage.path('model')}")
    return summary
