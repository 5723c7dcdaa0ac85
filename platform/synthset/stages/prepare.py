"""The prepare stage, first in the pipeline: read ``data.source`` once, write its splits as shards.

``run_prepare(cfg)`` reads the source (``splits.load_source``: decoding, ``data.channels``,
``data.image_size``, ``data.on_bad_image``), splits it (``splits.split_source``: seeded,
recorded) and writes ``<output.root>/prepare/<hash>/`` (``data/prepare.py`` describes the
layout). Its hash covers the ``data`` section but ``data.caption``, so every config with the
same data shares one prepared copy, and a rerun reuses it without touching the source.

Every later stage gets its real images from ``load_splits(cfg)``: the prepared shards decoded
once per process (a Ray worker decodes them itself; nothing travels through memory between
stages) and cached. When the stage has not run yet (a stage job started on its own, a test
calling a stage function), ``load_splits`` runs it first.

The source is read and split in memory before anything is written: a missing folder, an
unreadable image or a bad split size fails naming the field or file, and leaves no stage
directory behind.
"""

from __future__ import annotations

import time

from synthset.config import Config
from synthset.stages.common import StageDir

_CACHE: dict[tuple[str, str], object] = {}  # (prepare dir, public shift) → Splits, per process


def prepare_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "prepare")


def run_prepare(cfg: Config, tracker=None) -> dict:
    """Prepare ``cfg.data`` unless it is already prepared; return the stage summary."""
    from synthset.data.prepare import write_prepared
    from synthset.data.splits import load_source, split_source

    stage = prepare_dir(cfg)
    if stage.is_complete():
        return stage.reuse(stage.uri)
    t0 = time.time()
    train, test = load_source(cfg.data)  # the one read of the source in a pipeline run
    splits = split_source(cfg.data, train, test)
    splits.private.skipped = list(train.skipped)  # split_source's subsets drop them; prepared.json lists them
    splits.test.skipped = list(test.skipped)
    read_seconds = time.time() - t0
    stage.begin(cfg)
    record = write_prepared(stage.uri, splits, cfg.data)
    summary = stage.complete({"dir": stage.uri, "class_names": record["class_names"], "counts": record["counts"],
                              "channels": record["channels"], "image_shape": record["image_shape"],
                              "skipped": len(record["skipped"]), "read_seconds": read_seconds,
                              "seconds": time.time() - t0})
    counts = ", ".join(f"{k} {v}" for k, v in record["counts"].items())
    print(f"[prepare] {cfg.data.source}: {counts} images, {record['channels']} channel(s), "
          f"{'x'.join(map(str, record['image_shape'][:2]))} px → {stage.uri} ({time.time() - t0:.1f}s)")
    if tracker is not None:
        tracker.log_stage("prepare", cfg, metrics={f"images_{k}": v for k, v in record["counts"].items()})
    return summary


def load_splits(cfg: Config):
    """The prepared ``splits.Splits`` of ``cfg`` (public shift applied), preparing them first if needed."""
    from synthset.data.prepare import read_prepared

    stage = prepare_dir(cfg)
    key = (stage.uri, cfg.data.public_shift)
    if key not in _CACHE:
        if not stage.is_complete():
            run_prepare(cfg)
        _CACHE[key] = read_prepared(stage.uri, cfg.data)
    return _CACHE[key]


def prepared_channels(cfg: Config) -> int:
    """How many channels the prepared images have (1 or 3): what every model of the pipeline reads."""
    return load_splits(cfg).private.channels
