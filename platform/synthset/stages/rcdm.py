"""RCDM's two stages around synthesis: training its denoiser, and the centroid-band filter after it.

``run_rcdm_generator``: trains ``diffusion.rcdm.RCDMDenoiser`` on the private images conditioned on
their embeddings (the embed stage) or, for the class-conditioned baseline, on their labels, through
the same Ray Train driver as CASD's generator (``stages.generator.train_in_stage`` with the
``diffusion.rcdm.DDPM`` objective): ``synthesis.rcdm.train.workers`` ``TorchTrainer`` workers,
safetensors checkpoints every ``checkpoint_every`` steps under ``<stage>/ray``, so a stage killed
part-way continues from its last checkpoint when rerun (``--no-resume`` starts over). Writes
``<output.root>/rcdm_generator/<hash>/``: ``model/`` (the EMA weights as ``model.safetensors``,
``rcdm.json`` naming the embeddings file), ``training_set.safetensors``, ``init.safetensors``,
``loss.png``, ``grids/`` (with ``sample_every``) and ``_SUCCESS.json`` last. With an object-store
``output.root`` the model and loss plot are written to a local temporary directory and uploaded before
``_SUCCESS.json`` (Ray Train keeps its checkpoints in the store itself; no grids are drawn).

``run_rcdm_filter``: why the filter runs *after* synthesis, as its own stage. The seed ranks each
class's generated images by the distance of their embedding to the class centroid and keeps the
middle: a rank within the whole class, which no single batch or shard can know. Over-generating in
``generate_batch`` against fixed distance thresholds would keep a band of the *real* distances, not
the ranks, and its counts would depend on how candidates fall. So synthesis writes all
``images_per_class`` images as usual (deterministic and resumable per shard), and this stage:

1. embeds each synthesis shard's images with the same encoder and stores their distances to the
   class centroids (of the real private embeddings) as ``distances/shard-NNNNNN.npy`` (skipped on a
   rerun: resumable per shard);
2. ranks per class over all shards, ties broken by image index (``diffusion.rcdm.band_keep``): a pure
   function of the generated images, so the kept set is the same however often it was interrupted;
3. writes each shard's kept samples to a shard of the same number (atomic, skipped when complete),
   each sample's JSON gaining ``centroid_distance``, and ``manifest.json`` last with the counts kept
   and dropped per class (``filter``).

The label stage then reads the filtered dataset. With the filter off, the stage is not run.
"""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np

from synthset import storage
from synthset.config import Config
from synthset.stages.common import StageDir


def generator_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "rcdm_generator")


def filter_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "rcdm_filter")


def denoiser_arch(cfg: Config, embed_dim: int, num_classes: int, channels: int) -> dict:
    m = cfg.synthesis.rcdm.model
    return {"image_size": cfg.data.image_size, "image_channels": channels, "channels": list(m.channels),
            "layers_per_block": m.layers_per_block, "norm_groups": m.norm_groups,
            "attention_levels": list(m.attention_levels), "conditioning": m.conditioning,
            "embed_dim": embed_dim, "num_classes": num_classes, "num_train_timesteps": m.num_train_timesteps}


def train_settings(cfg: Config):
    """RCDM's recipe (``synthesis.rcdm.train``): no warm-up or class dropout, the learning rate decaying by a half
    cosine to zero over the run's steps."""
    from synthset.diffusion.generator_training import TrainSettings

    tr = cfg.synthesis.rcdm.train
    return TrainSettings(batch_size=tr.batch_size, lr=tr.lr, warmup_steps=0, ema_decay=tr.ema_decay,
                         class_dropout=0.0, max_grad_norm=tr.max_grad_norm, seed=tr.seed, decay_steps=tr.steps)


def run_rcdm_generator(cfg: Config, embed: dict, resume: bool = True, tracker=None) -> dict:
    """Train (or reuse, or resume) the RCDM denoiser (or the class-conditioned baseline) on the private split;
    the stage summary. Needs Ray (``stages.common.init_ray``)."""
    import torch

    from synthset.diffusion.generator_training import TrainingSet
    from synthset.diffusion.rcdm import DDPM, build_denoiser, save_denoiser
    from synthset.plots import save_curves
    from synthset.models.encoders import read_embeddings
    from synthset.stages.generator import grid_files, train_in_stage
    from synthset.stages.prepare import load_splits

    stage = generator_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("model"))
    stage.begin(cfg)
    tr = cfg.synthesis.rcdm.train
    splits = load_splits(cfg)
    arrays = read_embeddings(embed["embeddings"])
    positions = arrays["position"]
    if not np.array_equal(arrays["labels"], splits.private.labels[positions]):
        raise RuntimeError(f"{embed['embeddings']}: embeddings do not match the private split (rerun the embed stage)")
    pixels = splits.private.read(positions, cfg.data.image_size)  # uint8 (N, H, W[, C]): converted per batch
    x = torch.from_numpy(np.ascontiguousarray(pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)))
    names = splits.class_names
    data = TrainingSet(x, torch.from_numpy(arrays["labels"].astype(np.int64)), None, len(names),
                       torch.from_numpy(arrays["embeddings"]).float())
    arch = denoiser_arch(cfg, int(arrays["embeddings"].shape[1]), len(names), int(x.shape[1]))
    model = build_denoiser(arch, seed=tr.seed)
    print(f"[rcdm_generator] {cfg.synthesis.rcdm.model.conditioning}-conditioned denoiser "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {tr.steps} steps of "
          f"{tr.batch_size} on {len(x)} images, {tr.workers} worker(s) → {stage.uri}")
    final, state, metrics, local = train_in_stage(stage, model, data, train_settings(cfg), tr, names, resume, DDPM)
    out = stage.path("model")
    save_denoiser(final, os.path.join(local, "model"), {"embeddings": embed["embeddings"], "encoder": embed["encoder"]})
    save_curves({"rcdm": state["losses"]}, os.path.join(local, "loss.png"), "RCDM: DDPM loss")
    remote = not storage.is_local(stage.uri)
    if remote:  # train_in_stage wrote into a temporary directory: the model and plot go up before _SUCCESS.json
        storage.upload_dir(os.path.join(local, "model"), out)
        with open(os.path.join(local, "loss.png"), "rb") as f:
            storage.write_bytes(stage.path("loss.png"), f.read())
    summary = stage.complete({"model": out, **metrics})
    if tracker is not None:
        tracker.log_stage("rcdm_generator", cfg, metrics=metrics, params=cfg.synthesis.rcdm.model_dump(mode="json"),
                          artifacts=[os.path.join(local, "loss.png"), *grid_files(local)])
    if remote:
        shutil.rmtree(local, ignore_errors=True)
    print(f"[rcdm_generator] {metrics['steps']} steps ({metrics['steps_per_s']:.2f} steps/s, resumed from "
          f"{metrics['resumed_from']}), final loss {metrics['final_loss']:.4f} → {out}")
    return summary


def _shard_distances(path: str, fn, centroids: np.ndarray, metric: str, size: int, channels: int,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distances, class ids, image indices) of one synthesis shard's images."""
    import torch

    from synthset.data.shards import image_to_tensor, iter_shard
    from synthset.diffusion.rcdm import centroid_distances
    from synthset.stages.embed import embed_images

    samples = list(iter_shard(path))
    if not samples:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    x = torch.stack([image_to_tensor(s["image"], size, channels) for s in samples])
    labels = np.array([s["cls"] for s in samples], dtype=np.int64)
    emb = embed_images(fn, x, batch_size)
    return (centroid_distances(emb, labels, centroids, metric), labels,
            np.array([int(s["key"]) for s in samples], dtype=np.int64))


def _save_npy(uri: str, arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arrays, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())


def run_rcdm_filter(cfg: Config, synthesis: dict, embed: dict, resume: bool = True, tracker=None) -> dict:
    """Keep each class's middle band of centroid distances (see the module docstring); the stage summary."""
    from synthset.data.shards import completed_shards, iter_shard, read_manifest, write_manifest, write_shard
    from synthset.diffusion.rcdm import band_keep, class_centroids
    from synthset.models.encoders import read_embeddings
    from synthset.stages.embed import encoder_function

    stage = filter_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("data"))
    flt = cfg.synthesis.rcdm.filter
    source = synthesis["dataset"]
    src = read_manifest(source)
    names = src["class_names"]
    stage.begin(cfg)
    t0 = time.time()
    real = read_embeddings(embed["embeddings"])
    centroids = class_centroids(real["embeddings"], real["labels"], len(names), flt.metric)
    fn = None
    channels = 3 if cfg.data.channels == 3 else 1
    parts = []
    for i, entry in enumerate(src["shards"]):  # 1. distances per shard, cached
        uri = stage.path("distances", f"{entry['shard']}.npy")
        if resume and storage.exists(uri):
            table = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
        else:
            if fn is None:
                fn = encoder_function(embed["encoder"])
            d, labels, index = _shard_distances(storage.join(source, entry["shard"]), fn, centroids, flt.metric,
                                                cfg.data.image_size, channels, cfg.synthesis.rcdm.embed.batch_size)
            table = np.stack([d, labels.astype(np.float64), index.astype(np.float64)])
            _save_npy(uri, table)
        parts.append(table)
    table = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0))
    distance, labels, index = table[0], table[1].astype(np.int64), table[2].astype(np.int64)
    order = np.argsort(index, kind="stable")  # rank ties broken by image index, whatever the shard layout
    keep_sorted = band_keep(distance[order], labels[order], flt.low, flt.high)
    kept = dict(zip(index[order].tolist(), keep_sorted.tolist()))
    dist_of = dict(zip(index.tolist(), distance.tolist()))
    dataset = stage.path("data")  # 3. the kept samples, shard by shard
    if not resume:
        storage.delete_dir_contents(dataset)
    done = completed_shards(dataset) if resume else {}
    stats = []
    for i, entry in enumerate(src["shards"]):
        if i in done:
            stats.append(done[i])
            continue
        samples = []
        for s in iter_shard(storage.join(source, entry["shard"]), decode=False):
            if kept[int(s["key"])]:
                s["image_bytes"] = s.pop("image")
                s["meta"] = {**s["meta"], "centroid_distance": dist_of[int(s["key"])]}
                samples.append(s)
        stats.append(write_shard(dataset, i, samples, cfg.synthesis.image_format, {"seconds": time.time() - t0}))
    counts = {names[c]: {"generated": int((labels == c).sum()), "kept": int(keep_sorted[labels[order] == c].sum())}
              for c in range(len(names))}
    for c in counts.values():
        c["dropped"] = c["generated"] - c["kept"]
    summary_counts = {"generated": int(len(index)), "kept": int(keep_sorted.sum()),
                      "dropped": int(len(index) - keep_sorted.sum()), "per_class": counts,
                      "band": [flt.low, flt.high], "metric": flt.metric, "encoder": embed["encoder"]}
    manifest = write_manifest(dataset, {"config_hash": stage.hash, "class_names": names, "method": src["method"],
                                        "generator": src["generator"], "run_seed": src.get("run_seed"),
                                        "source": source, "filter": summary_counts}, stats)
    seconds = time.time() - t0
    print(f"[rcdm_filter] kept {summary_counts['kept']} of {summary_counts['generated']} images "
          f"(band [{flt.low}, {flt.high}) of centroid distance, {flt.metric}) → {dataset}")
    if tracker is not None:
        tracker.log_stage("rcdm_filter", cfg, metrics={"filter_kept": summary_counts["kept"],
                                                       "filter_dropped": summary_counts["dropped"]})
    return stage.complete({"dataset": dataset, "num_samples": manifest["num_samples"], "filter": summary_counts,
                           "seconds": seconds})
