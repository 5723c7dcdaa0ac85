"""What every stage shares: its output directory keyed by config hash, and starting Ray.

A stage writes under ``<output.root>/<stage>/<stage hash>/``: the resolved config
(``config.yaml``, ``config_hash``), its artifacts, and ``_SUCCESS.json`` last. A stage whose
``_SUCCESS.json`` exists is skipped, so rerunning a job does no duplicate work.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from synthset import storage
from synthset.config import Config, config_hash, stage_hash

SUCCESS = "_SUCCESS.json"


@dataclass
class StageDir:
    stage: str
    hash: str
    uri: str

    @classmethod
    def for_config(cls, cfg: Config, stage: str, extra=None) -> "StageDir":
        h = stage_hash(cfg, stage, extra)
        name = stage if extra is None else f"{stage}-{extra}"
        return cls(stage, h, storage.join(output_root(cfg), name, h))

    def path(self, *parts: str) -> str:
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
        storage.makedirs(self.uri)
        storage.write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())
        storage.write_json(self.path("config_hash.json"), {"stage": self.stage, "stage_hash": self.hash,
                                                           "config_hash": config_hash(cfg.to_dict())})

    def complete(self, summary: dict) -> dict:
        summary = {"stage": self.stage, "stage_hash": self.hash, "completed_at": time.time(), **summary}
        storage.write_json(self.path(SUCCESS), summary)
        return summary


def output_root(cfg: Config) -> str:
    root = cfg.output.root
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))




def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` or start a local Ray (quietly) if none is running in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train's print patch would echo every worker line twice; its placement-group cleaner
    # queries the state API, which needs the dashboard process, so that stays on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"address": cfg.ray.address, "log_to_driver": True,
              "configure_logging": True, "logging_level": "warning"}
    if cfg.ray.address is None:
        kwargs["num_cpus"] = cfg.ray.num_cpus or os.cpu_count()
        # Local runs import synthset from this checkout; clusters get it from the image/runtime env.
        src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([src, *paths])),
                                              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    ray.init(**kwargs)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
    except AttributeError:
        pass
