"""The shard-pool runner: every per-item stage (prepare, caption, synthesis, label, embed, replication,
filters) is one function over one task — usually one shard — run here.

``run_shard_pool(tasks, worker, worker_kwargs, resources, name, total, done)``:

* ``tasks`` are small JSON-able dicts (a shard number and its range, a list of file refs);
* ``worker`` is a class: constructed once per pool actor (``worker(**worker_kwargs)`` loads the model,
  opens the source…), then called once per task (``worker(task) -> stats``, a JSON-able dict whose
  ``count`` says how many items the task covered); it writes its own output atomically;
* with Ray initialised, the tasks are rows of a Ray Dataset mapped by a pool of actors
  (``ActorPoolStrategy(min, max)``, ``num_cpus``/``num_gpus`` per actor from ``resources``); without
  Ray, or with ``resources.inline``, they run in this process, in order — the same function on the
  same tasks, so the outputs are the same bytes;
* the driver only receives the stats rows, reports progress (and to MLflow), and returns them.

Ray Data recreates a dead pool actor and retries its task on the replacement, without a bound (its
defaults; the loose remote args that set a bound are deprecated, removed in Ray 2.64): tasks are
deterministic and write atomically, so a retry is harmless. A task whose code raises fails the run
(``DataContext.max_errored_blocks = 0``), not retried; a bad input the worker names (``ValueError``,
``FileNotFoundError``: a bad image, a missing file) comes back as a row and is raised here as itself, so
the job's message names the file, not Ray's wrapper.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable

from synthset.progress import Progress


@dataclass(frozen=True)
class PoolResources:
    """How a pool runs: actors ``min``..``max``, each with ``num_cpus`` and ``num_gpus``; ``inline``: in this
    process (tests, small in-memory sources)."""

    min: int = 1
    max: int = 1
    num_cpus: float = 1
    num_gpus: float = 0
    inline: bool = False

    @classmethod
    def of(cls, actors, inline: bool = False) -> "PoolResources":
        """From an ``ActorsConfig`` section (``synthesis.actors``, ``label.actors`` …)."""
        return cls(actors.min, actors.max, actors.num_cpus, actors.num_gpus, inline)


def torch_setup(num_cpus: float, num_gpus: float, dtype: str = "float32"):
    """(device, torch dtype) of a pool worker: its torch threads follow its CPUs; a GPU when it has one."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def process_stats() -> dict:
    """Which process did the work and its peak memory so far (for the memory-at-scale benchmark)."""
    return {"pid": os.getpid(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _PoolActor:
    """The Ray Data callable around a worker: tasks in as JSON strings, stats out as JSON strings."""

    def __init__(self, worker: type, worker_kwargs: dict):
        self.worker = worker(**worker_kwargs)

    def __call__(self, batch: dict) -> dict:
        return {"stats": [json.dumps(_call(self.worker, json.loads(str(task)))) for task in batch["task"]]}


_USER_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def _call(worker, task: dict) -> dict:
    """``worker(task)``; a bad input it names (``ValueError``, ``FileNotFoundError``: a bad image, a missing file)
    comes back as a row, so the driver can raise it as itself instead of inside Ray's wrappers."""
    try:
        return worker(task)
    except tuple(_USER_ERRORS.values()) as err:
        kind = next(name for name, cls in _USER_ERRORS.items() if isinstance(err, cls))
        return {"error": {"type": kind, "message": str(err)}}
    finally:
        release_memory()


def release_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``) after a task.

    A task allocates thousands of image-sized blocks (encoded images, a tar built in memory) and frees
    them; glibc keeps the freed pages, fragmented, so without this a worker's RSS crept up shard after
    shard (prepare: +25 MB from 2,000 to 6,000 images, flat with it; tests/test_data_scale.py)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def run_shard_pool(tasks: list[dict], worker: type, worker_kwargs: dict, resources: PoolResources, name: str,
                   total: int, done: int = 0, tracker=None, unit: str = "images") -> list[dict]:
    """Run ``worker`` over ``tasks`` (see the module docstring); return the tasks' stats in completion order.

    ``total``/``done``: items in the whole stage and already done before (progress); ``tracker``: MLflow,
    which receives ``<name>_images_done`` and ``<name>_images_per_s`` as the work goes.
    """
    if not tasks:
        return []
    progress = Progress(name, total, unit, every=5.0)
    progress.done = done
    results = []

    def record(stats: dict) -> None:
        if "error" in stats:
            raise _USER_ERRORS[stats["error"]["type"]](stats["error"]["message"])
        results.append(stats)
        progress.update(stats.get("count", 0))
        if tracker is not None:
            tracker.log_metrics({f"{name}_{unit}_done": progress.done, f"{name}_{unit}_per_s": progress.rate},
                                step=progress.done)

    import ray

    if resources.inline or not ray.is_initialized():
        instance = worker(**worker_kwargs)
        for task in tasks:
            record(json.loads(json.dumps(_call(instance, json.loads(json.dumps(task))))))
        return results
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(_PoolActor, fn_constructor_kwargs={"worker": worker, "worker_kwargs": worker_kwargs},
                        batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=resources.min, max_size=resources.max),
                        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None)
    for row in ds.iter_rows():
        record(json.loads(row["stats"]))
    return results


def run_function(fn: Callable[..., Any], tasks: list[dict], fn_kwargs: dict, resources: PoolResources, name: str,
                 total: int, unit: str = "images") -> list[dict]:
    """``run_shard_pool`` for a plain function ``fn(task, **fn_kwargs) -> stats`` (no state to load once)."""
    return run_shard_pool(tasks, _FunctionWorker, {"fn": fn, "fn_kwargs": fn_kwargs}, resources, name, total,
                          unit=unit)


class _FunctionWorker:
    def __init__(self, fn: Callable[..., Any], fn_kwargs: dict):
        self.fn, self.fn_kwargs = fn, fn_kwargs

    def __call__(self, task: dict) -> dict:
        return self.fn(task, **self.fn_kwargs)
