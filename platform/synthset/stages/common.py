"""What every stage shares: its output directory keyed by config hash, and starting Ray.

A stage writes under ``<output.root>/<stage>/<stage hash>/``: the resolved config
(``config.yaml``, ``config_hash``), its artifacts, and ``_SUCCESS.json`` last. A stage whose
``_SUCCESS.json`` exists is skipped, so rerunning a job does no duplicate work.

A stage never writes outside ``output.root``: a stage directory or a file name within it that would
leave the root (a ``..`` segment, an absolute path, another bucket) is a ``ValueError`` before
anything is written (``StageDir``; ``storage.is_within``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from synthset import storage
from synthset.config import Config, config_hash, stage_hash

SUCCESS = "_SUCCESS.json"


@dataclass
class StageDir:
    """Where one stage writes: ``uri``, checked to lie under ``output.root`` (see the module docstring)."""

    stage: str
    hash: str
    uri: str

    def __post_init__(self):
        if ".." in str(self.uri).replace("://", "/").split("/"):
            raise ValueError(f"[{self.stage}] stage directory {self.uri!r} contains '..': a stage writes only "
                             "below output.root, at a path without '..'")

    @classmethod
    def for_config(cls, cfg: Config, stage: str, extra=None) -> "StageDir":
        h = stage_hash(cfg, stage, extra)
        name = stage if extra is None else f"{stage}-{extra}"
        out = cls(stage, h, storage.join(output_root(cfg), name, h))
        out.check_within(cfg)
        return out

    def check_within(self, cfg: Config) -> None:
        """Raise ``ValueError`` unless this directory lies under ``cfg``'s output root."""
        root = output_root(cfg)
        if not storage.is_within(root, self.uri):
            raise ValueError(f"[{self.stage}] stage directory {self.uri} is outside output.root ({root}): "
                             "refusing to write there; every stage writes below output.root")

    def path(self, *parts: str) -> str:
        """A file or folder inside this stage directory; a part that is absolute, a URI or holds '..' is an error."""
        for part in parts:
            part = str(part)
            if part.startswith(("/", "~")) or "://" in part or ".." in part.split("/"):
                raise ValueError(f"[{self.stage}] {part!r}: not a relative path inside the stage directory "
                                 f"{self.uri}; refusing to write outside it")
        return storage.join(self.uri, *parts)

    def is_complete(self) -> bool:
        return storage.exists(self.path(SUCCESS))

    def summary(self) -> dict:
        return storage.read_json(self.path(SUCCESS))

    def reuse(self, what: str) -> dict:
        """Announce that ``what`` is reused and return the stored summary, marked ``reused``."""
        print(f"[{self.stage}] reusing {what} (config hash {self.hash})")
        return {**self.summary(), "reused": True}

    def begin(self, cfg: Config) -> None:
        self.check_within(cfg)
        storage.makedirs(self.uri)
        storage.write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())
        storage.write_json(self.path("config_hash.json"), {"stage": self.stage, "stage_hash": self.hash,
                                                           "config_hash": config_hash(cfg.to_dict())})

    def complete(self, summary: dict) -> dict:
        summary = {"stage": self.stage, "stage_hash": self.hash, "completed_at": time.time(), **summary}
        storage.write_json(self.path(SUCCESS), summary)
        return summary


def completion(stages: list[StageDir]) -> list[bool | None]:
    """``is_complete()`` of each stage, or None for every stage once storage cannot be reached (a dry run
    offline, or without the object store's credentials): one failed attempt, not one per stage."""
    done: list[bool | None] = []
    for stage in stages:
        try:
            done.append(stage.is_complete())
        except OSError as err:
            print(f"cannot reach {stage.uri} ({str(err).splitlines()[0][:160]}): stage completion unknown",
                  file=sys.stderr)
            return done + [None] * (len(stages) - len(done))
    return done


def output_root(cfg: Config) -> str:
    root = cfg.output.root
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))




def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` or start a local Ray (quietly) if none is running in this process.

    With ``ray.address`` unset, a driver started by ``ray job submit`` (``RAY_ADDRESS`` set by the job
    supervisor) joins its cluster, with the job's runtime environment, instead of starting one.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train's print patch would echo every worker line twice; its placement-group cleaner
    # queries the state API, which needs the dashboard process, so that stays on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"address": cfg.ray.address, "log_to_driver": True,
              "configure_logging": True, "logging_level": "warning"}
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = cfg.ray.num_cpus or os.cpu_count()
        # Ray starts its workers at niceness 15 below its own processes; on a machine the job has to itself
        # that makes every stage's actors yield to Ray's bookkeeping (the synthesis pool lost ~30 % of the
        # bare loop's speed on 2 cores: docs/benchmarks.md). `ray job submit` gives workers 0 the same way.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Local runs import synthset from this checkout; clusters get it from the image/runtime env.
        src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([src, *paths])),
                                              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    ray.init(**kwargs)
    context = ray.data.DataContext.get_current()
    # Progress is ours (Progress); Ray Data's per-object location and per-node metrics cost the busy workers
    # CPU on a small machine and tell a stage nothing (docs/benchmarks.md, synthesis efficiency).
    for name in ("enable_progress_bars", "enable_get_object_locations_for_metrics", "enable_per_node_metrics",
                 "enable_auto_log_stats"):
        if hasattr(context, name):
            setattr(context, name, False)
