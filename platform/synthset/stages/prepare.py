"""The prepare stage, first in the pipeline: read ``data.source`` once, write its splits as shards.

``run_prepare(cfg)`` lists the source and draws the splits on the list (``data/prepare.py``:
``plan_prepare``), then decodes, converts (``data.channels``), fits (``data.image_size``) and writes
one shard per task through the shard-pool runner: Ray tasks across the cluster when Ray is running
(the pipeline starts it first), threads of this process otherwise, and always in this process for a
source whose images are already arrays here (Fashion-MNIST, digits). Under ``data.on_bad_image:
skip`` the images that cannot be decoded are found first, in parallel the same way. No process
holds a split: memory follows one shard per task. Output: ``<output.root>/prepare/<hash>/``
(``data/prepare.py`` describes the layout); its hash covers the ``data`` section but
``data.caption``, so every config with the same data shares one prepared copy, and a rerun reuses it
without touching the source.

Every later stage gets its real images through ``load_splits(cfg)``: ``PreparedSplit`` handles
(labels, keys and source indices in memory; images read from the shards when a stage asks), cached
per process because they are small. When the stage has not run yet (a stage job started on its own,
a test calling a stage function), ``load_splits`` runs it first.

Errors that need no decoding (a missing folder, an empty class, a bad label, a split size) fail
before anything is written; an image that cannot be decoded fails when its shard is written, naming
the file, and the stage directory this run created is removed: nothing half-written stays behind.
"""

from __future__ import annotations

import os
import time

from synthset import storage
from synthset.config import Config, DataConfig
from synthset.data.prepare import (PreparePlan, check_refs, finish_prepared, plan_prepare, read_prepared, shard_specs,
                                   write_prepared_shard)
from synthset.data.source_base import Source
from synthset.data.sources import open_source
from synthset.stages.common import StageDir
from synthset.stages.shard_pool import PoolResources, run_function

_CACHE: dict[tuple[str, str], object] = {}  # (prepare dir, public shift) → Splits of handles (small), per process
CHECK_CHUNK = 1000  # images per bad-image check task
# A source of files with at least this many images is prepared by Ray tasks (Ray is started for it when no
# job started it yet); a smaller one in this process, where Ray's start-up would cost more than it saves.
PARALLEL_MIN_IMAGES = 4000


def prepare_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "prepare")


def _source(data: dict) -> tuple[Source, int | None]:
    cfg = DataConfig.model_validate(data)
    source = open_source(cfg)
    return source, None if source.native_size else cfg.image_size


def _check_task(task: dict, data: dict) -> dict:
    source, size = _source(data)
    bad = check_refs(source, task["refs"], size)
    return {"count": len(task["refs"]), "start": task["start"], "bad": {str(k): v for k, v in bad.items()}}


def _write_task(task: dict, data: dict, uri: str) -> dict:
    source, size = _source(data)
    try:
        return {"count": len(task["refs"]), **write_prepared_shard(uri, task, source, size)}
    finally:
        getattr(source, "close", lambda: None)()


class _InProcess:
    """The tasks of a source whose images are already arrays in this process: one open source for all."""

    def __init__(self, source: Source, size: int | None):
        self.source, self.size = source, size

    def check(self, task: dict, **_) -> dict:
        bad = check_refs(self.source, task["refs"], self.size)
        return {"count": len(task["refs"]), "start": task["start"], "bad": {str(k): v for k, v in bad.items()}}

    def write(self, task: dict, uri: str, **_) -> dict:
        return {"count": len(task["refs"]), **write_prepared_shard(uri, task, self.source, self.size)}


def _resources(cfg: Config, in_process: bool, images: int) -> PoolResources:
    import ray

    from synthset.stages.common import init_ray

    if not in_process and images >= PARALLEL_MIN_IMAGES:
        init_ray(cfg)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
    return PoolResources(min=1, max=workers, num_cpus=1, inline=in_process)


def plan(cfg: Config, check_images: bool = True) -> PreparePlan:
    """List ``cfg``'s source and draw its splits (no image kept); under ``on_bad_image: skip`` the images that
    cannot be decoded are found first, by parallel tasks when Ray is running (``check_images=False``: not
    looked for, a quick plan for checks before Ray starts; the splits may then still hold such images)."""
    source = open_source(cfg.data)
    from synthset.data.source_base import ArraySource

    in_process = isinstance(source, ArraySource)
    data = cfg.data.model_dump(mode="json")

    def find_bad(part, listed):
        tasks = [{"start": a, "refs": listed.refs[a:a + CHECK_CHUNK]} for a in range(0, len(listed), CHECK_CHUNK)]
        if in_process:
            size = None if source.native_size else cfg.data.image_size
            fn, kwargs = _InProcess(source, size).check, {}
        else:
            fn, kwargs = _check_task, {"data": data}
        found = run_function(fn, tasks, kwargs, _resources(cfg, in_process, len(listed)),
                             "prepare-check", len(listed))
        return {s["start"] + int(k): tuple(v) for s in found for k, v in s["bad"].items()}

    return plan_prepare(cfg.data, find_bad if check_images else (lambda part, listed: {}), source)


def run_prepare(cfg: Config, tracker=None, prepared_plan: PreparePlan | None = None) -> dict:
    """Prepare ``cfg.data`` unless it is already prepared; return the stage summary.

    ``prepared_plan``: the plan ``plan(cfg)`` already made (the pipeline lists the source before Ray starts).
    """
    stage = prepare_dir(cfg)
    if stage.is_complete():
        return stage.reuse(stage.uri)
    t0 = time.time()
    the_plan = prepared_plan or plan(cfg)
    read_seconds = time.time() - t0
    specs = shard_specs(the_plan)
    created = _created_dirs(stage)
    stage.begin(cfg)
    try:
        if the_plan.in_process:
            fn, kwargs = _InProcess(the_plan.source, the_plan.size).write, {"uri": stage.uri}
        else:
            fn, kwargs = _write_task, {"data": cfg.data.model_dump(mode="json"), "uri": stage.uri}
        images = sum(len(s["refs"]) for s in specs)
        stats = run_function(fn, specs, kwargs, _resources(cfg, the_plan.in_process, images), "prepare", images)
        record = finish_prepared(stage.uri, the_plan, cfg.data, stats)
    except BaseException:
        _remove_created(created or [stage.uri])
        raise
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


def _created_dirs(stage: StageDir) -> list[str]:
    """The local directories from the output root down to ``stage`` that do not exist yet (outermost first)."""
    if not storage.is_local(stage.uri):
        return [stage.uri]  # object storage: the stage prefix is ours to clear
    path, missing = os.path.abspath(storage.local_path(stage.uri)), []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def _remove_created(created: list[str]) -> None:
    """Undo a failed prepare: the outermost directory it created (or the incomplete stage directory it wrote
    into), so that nothing half-written stays behind."""
    import shutil

    if not created:
        return
    if not storage.is_local(created[0]):
        storage.delete_dir_contents(created[0])
        return
    shutil.rmtree(created[0], ignore_errors=True)


def load_splits(cfg: Config):
    """The prepared ``splits.Splits`` of ``cfg`` as ``PreparedSplit`` handles (public shift applied when read),
    preparing them first if needed."""
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
