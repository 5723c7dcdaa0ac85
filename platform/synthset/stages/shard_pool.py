"""The shard-pool runner: every per-item stage (prepare, caption, synthesis, label, embed, replication,
filters) is one function over one task — usually one shard — run here.

``run_shard_pool(tasks, worker, worker_kwargs, resources, name, total, done)``:

* ``tasks`` are small JSON-able dicts (a shard number and its range, a list of file refs);
* ``worker`` is a class: constructed once per pool actor (``worker(**worker_kwargs)`` loads the model,
  opens the source…), then called once per task (``worker(task) -> stats``, a JSON-able dict whose
  ``count`` says how many items the task covered); it writes its own output atomically;
* with Ray initialised, a pool of up to ``max`` Ray actors (``num_cpus``/``num_gpus`` each from
  ``resources``) takes the tasks, each actor the next task as soon as it is free; without Ray, or with
  ``resources.inline``, they run in this process, in order — the same function on the same tasks, so
  the outputs are the same bytes;
* the driver only receives the stats rows, reports progress (and to MLflow), and returns them.

Why Ray actors and not a Ray Data ``map_batches`` over an ``ActorPoolStrategy`` (what this runner was
until 7 December): a task here is a whole shard (a thousand images, seconds to minutes of work), so
Ray Data's block handling has nothing to overlap, while its executor loop, stats and location actors
took ~8 % of a 2-core machine from the model and its default ran the worker on a side thread where
torch ran ~25 % slower; the synthesis pipeline reached 0.87 of a bare loop that way and ~0.92 with
plain actors (docs/benchmarks.md). What Ray Data gave is kept: the task of an actor that died (a lost
node) is run again by the next free actor and the actor is restarted (tasks are deterministic and write
atomically, so a retry is harmless); a task whose code raises fails the run, not retried; a bad input the worker names
(``ValueError``, ``FileNotFoundError``: a bad image, a missing file) comes back as a row and is raised
here as itself, so the job's message names the file, not Ray's wrapper.
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
    """The pool actor around a worker: tasks in as JSON strings, stats out as JSON strings."""

    def __init__(self, worker: type, worker_kwargs: dict):
        started = time.time()
        self.worker = worker(**worker_kwargs)
        self.init = {"actor_started_at": started, "actor_init_seconds": time.time() - started}

    def ready(self) -> bool:
        return True

    def __call__(self, batch: dict) -> dict:
        rows = []
        for task in batch["task"]:
            stats = _call(self.worker, json.loads(str(task)))
            if self.init:  # the actor's start-up, reported with its first task (benchmarks read it)
                stats, self.init = {**stats, **self.init}, None
            rows.append(json.dumps(stats))
        return {"stats": rows}


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
    for stats in _actor_pool(tasks, worker, worker_kwargs, resources):
        record(stats)
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



def _actor_pool(tasks: list[dict], worker: type, worker_kwargs: dict, resources: PoolResources):
    """Stats of ``tasks`` run by up to ``resources.max`` pool actors, each given the next task when it is free.

    Actors are used as they become ready (an actor the cluster cannot place yet does not hold up the others);
    at least ``resources.min`` must start. When an actor dies its task goes back to the queue for the next
    free actor, and Ray restarts the actor (``max_restarts``) to rejoin when it fits: tasks are deterministic
    and write atomically, so a task run twice writes the same bytes.
    """
    import ray

    actor_cls = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or 0, max_restarts=-1,
                           max_task_retries=0)(_PoolActor)
    actors = [actor_cls.remote(worker, worker_kwargs) for _ in range(max(resources.min, resources.max))]
    starting = {actor.ready.remote(): actor for actor in actors}
    queue, running, idle = [json.dumps(t) for t in tasks], {}, []
    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # a node gone, an actor restarting
    try:
        while queue or running:
            while queue and idle:
                actor, task = idle.pop(), queue.pop(0)
                running[actor.__call__.remote({"task": [task]})] = (actor, task)
            done, _ = ray.wait(list(running) + list(starting), num_returns=1)
            if done[0] in starting:
                actor = starting.pop(done[0])
                try:
                    ray.get(done[0])  # a worker that cannot start (a missing model) fails here, as itself
                except lost:  # still restarting on another node: ask again shortly
                    time.sleep(0.5)
                    starting[actor.ready.remote()] = actor
                    continue
                idle.append(actor)
                continue
            actor, task = running.pop(done[0])
            try:
                rows = ray.get(done[0])["stats"]
            except lost:
                # Its actor died (a node lost, a spot instance taken back): the task goes to the next free
                # actor, and the actor, restarted by Ray wherever it fits, rejoins once it is ready.
                queue.insert(0, task)
                starting[actor.ready.remote()] = actor
                continue
            idle.append(actor)
            for row in rows:
                yield json.loads(row)
    finally:
        for actor in actors:
            ray.kill(actor)
