"""Embed stage: an image encoder's embedding of every private image (what RCDM conditions on).

The encoder is ``synthesis.rcdm.embed.encoder``:

* ``public_cnn`` (the embedded default): the platform's small CNN (``models/classifiers.py``) trained
  here on the *public* split, its penultimate layer the embedding. Chosen over the Teacher's
  penultimate features because (1) like DINOv2 or CLIP in production it never saw a private image,
  so the conditioning space is a fixed, pre-existing representation and not one fit to the very
  images the generator and LiRA ask about; (2) the embed stage's hash then depends only on
  ``data`` and its own settings, not on the Teacher (whose section is not among the synthesis
  stage's hash inputs). It costs one small training run (seconds on Fashion-MNIST).
* a transformers image model by hub id or local directory (DINOv2, CLIP vision): its pooled / CLS
  output (``models.encoders.feature_extractor``, the same extractor as the generative metrics).

Embeds the private split, or a class-balanced subset of it (``synthesis.rcdm.embed.real_images``:
RCDM's "private set", what its generator trains on and is conditioned on). Writes
``<output.root>/embed/<hash>/embeddings.safetensors`` (``embeddings`` (N, D) float32, ``labels`` (N,)
int64, ``position`` (N,) positions in the private split, ``index`` (N,) the source's indices) and, for ``public_cnn``, the
encoder under ``encoder/`` (safetensors). Nothing is pickled. Skipped when complete for the same hash.
With an object-store ``output.root`` both are written to a local temporary directory and uploaded before
``_SUCCESS.json``; readers take them by URI (``models.encoders.read_embeddings``, ``encoder_function``).

Run it alone: ``python jobs/pipeline.py --config conf/rcdm.yaml`` runs it before the generator.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from synthset import storage
from synthset.config import ClassifierConfig, Config
from synthset.models.encoders import PUBLIC_CNN, check_encoder
from synthset.stages.common import StageDir

EMBEDDINGS = "embeddings.safetensors"


def embed_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "embed")


def encoder_function(spec: str, device: str = "cpu") -> Callable:
    """images (B, C, H, W) in [-1, 1] → embeddings (B, D) for an encoder directory or spec.

    ``spec``: a directory holding a platform classifier (``classifier.json``: its ``embed``; an object-store
    URI is read through a cached local copy, ``storage.materialize``), or a transformers model by hub id /
    directory (DINOv2, CLIP vision: pooled or CLS output).
    """
    from synthset.models.encoders import feature_extractor

    spec = storage.materialize(spec)  # a local path or hub id as it is
    if (Path(spec) / "classifier.json").is_file():
        from synthset.models.classifiers import load_classifier

        return load_classifier(spec, device).embed
    return feature_extractor(spec, device=device)


def embed_images(fn: Callable, images, batch_size: int = 256) -> np.ndarray:
    """``fn`` over float images (N, C, H, W) in batches, without gradients → float32 (N, D)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(fn(images[i:i + batch_size]).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def balanced_subset(labels: np.ndarray, total: int | None, num_classes: int, seed: int) -> np.ndarray:
    """Sorted positions of a class-balanced subset of ``total`` images (``total // C`` per class, the first
    ``total mod C`` classes one more), drawn with ``seed``; all positions when ``total`` is None or too big."""
    if total is None or total >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        want = total // num_classes + (1 if c < total % num_classes else 0)
        chosen.append(rng.permutation(rows)[:want])
    return np.sort(np.concatenate(chosen))


def train_public_encoder(cfg: Config, splits, out: str) -> str:
    """Train the small CNN on the public split's labelled images and save it to ``out``; returns ``out``."""
    import torch

    from synthset.models.classifiers import build_classifier, save_classifier
    from synthset.models.training import classifier_batches, fit_classifier

    e = cfg.synthesis.rcdm.embed
    if len(splits.public) == 0:
        raise ValueError(f"synthesis.rcdm.embed.encoder={PUBLIC_CNN!r} trains on the public split, but "
                         "data.splits.public is 0")
    ccfg = ClassifierConfig(arch="cnn", width=e.public_width, epochs=e.public_epochs, lr=e.public_lr,
                            seed=e.public_seed, batch_size=128)
    channels = splits.public.channels
    batches, steps, _ = classifier_batches(splits.public, ccfg, cfg.data.image_size, channels)
    torch.manual_seed(ccfg.seed)
    model = build_classifier(ccfg, len(splits.class_names), in_channels=channels)
    fit_classifier(model, batches, ccfg.epochs, steps, ccfg.lr, ccfg.weight_decay, soft=False, temperature=1.0,
                   augment=True, seed=ccfg.seed, name="embed-encoder")
    save_classifier(model, out, ccfg, len(splits.class_names), channels, {"role": "rcdm-encoder",
                                                                          "trained_on": "public"})
    return out


def run_embed(cfg: Config, resume: bool = True, tracker=None) -> dict:
    """Embed the private split; return the stage summary (``embeddings``: the safetensors file, ``encoder``)."""
    import torch
    from safetensors.numpy import save_file

    from synthset.data.splits import to_unit_tensor
    from synthset.stages.prepare import load_splits

    stage = embed_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path(EMBEDDINGS))
    e = cfg.synthesis.rcdm.embed
    check_encoder(e.encoder)
    stage.begin(cfg)
    t0 = time.time()
    remote = not storage.is_local(stage.uri)
    local = tempfile.mkdtemp(prefix="embed-") if remote else storage.local_path(stage.uri)
    torch.set_num_threads(max(1, cfg.synthesis.rcdm.train.cpus_per_worker))
    splits = load_splits(cfg)
    encoder = e.encoder
    if encoder == PUBLIC_CNN:
        encoder = train_public_encoder(cfg, splits, os.path.join(local, "encoder"))
    fn = encoder_function(encoder)
    positions = balanced_subset(splits.private.labels, e.real_images, len(splits.class_names), e.seed)
    with torch.no_grad():  # the private images a batch at a time, straight from the shards
        parts = [fn(to_unit_tensor(x)).float().cpu().numpy()
                 for _, x in splits.private.batches(e.batch_size, positions, cfg.data.image_size)]
    emb = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    out = stage.path(EMBEDDINGS)
    save_file({"embeddings": emb, "labels": splits.private.labels[positions].astype(np.int64),
               "position": positions.astype(np.int64),
               "index": np.asarray(splits.private_index, dtype=np.int64)[positions]},
              os.path.join(local, EMBEDDINGS))
    if encoder != e.encoder:  # trained here: later stages read it from the stage directory
        encoder = stage.path("encoder") if remote else os.path.abspath(encoder)
    if remote:  # every file is in the store before _SUCCESS.json
        storage.upload_dir(local, stage.uri)
        shutil.rmtree(local, ignore_errors=True)
    seconds = time.time() - t0
    print(f"[embed] {len(emb)} private images → {emb.shape[1]}-d embeddings by {e.encoder} in {seconds:.0f}s → {out}")
    summary = stage.complete({"embeddings": out, "encoder": encoder, "dim": int(emb.shape[1]), "count": int(len(emb)),
                              "seconds": seconds})
    if tracker is not None:
        tracker.log_stage("embed", cfg, metrics={"embed_dim": emb.shape[1], "embed_count": len(emb)})
    return summary
