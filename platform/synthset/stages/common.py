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
import threading
import time
import uuid
from dataclasses import dataclass

# Stage functions run in Ray workers that validate configs (``Config.model_validate``): every method a config
# may name is registered wherever a stage module is loaded.
import synthset.methods  # noqa: F401
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
        """Raise ``ValueError`` unless this directory lies under ``cfg``'s output root, where links really lead."""
        root = output_root(cfg)
        if not storage.is_within(root, self.uri):
            raise ValueError(f"[{self.stage}] stage directory {self.uri} is outside output.root ({root}): "
                             "refusing to write there; every stage writes below output.root")
        if not storage.is_within(root, self.uri, resolve_links=True):
            real = os.path.realpath(storage.local_path(self.uri))
            raise ValueError(f"[{self.stage}] stage directory {self.uri} leads to {real} through a symbolic link, "
                             f"outside output.root ({root}): refusing to write there; remove the link")

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
        """Take this stage's lease (one writer at a time) and mark it incomplete before anything is written:
        ``_SUCCESS.json`` goes first, so a run killed while redoing a stage (``--no-resume``) never leaves
        an emptied stage that reads as complete."""
        self.check_within(cfg)
        storage.makedirs(self.uri)
        take_lease(self)
        storage.delete(self.path(SUCCESS))
        storage.write_bytes(self.path("config.yaml"), cfg.to_yaml().encode())
        storage.write_json(self.path("config_hash.json"), {"stage": self.stage, "stage_hash": self.hash,
                                                           "config_hash": config_hash(cfg.to_dict())})

    def complete(self, summary: dict) -> dict:
        summary = {"stage": self.stage, "stage_hash": self.hash, "completed_at": time.time(), **summary}
        storage.write_json(self.path(SUCCESS), summary)
        release_lease(self)
        return summary


# --- One writer per stage: a lease file with its owner and a heartbeat ---------------------------------
#
# ``begin`` takes ``_LEASE.json`` (owner: host, pid and a token of this process; heartbeat: when it last said
# it is alive) and a thread of this process renews every lease it holds each LEASE_RENEW seconds; ``complete``
# gives it back. A second run of the same stage finds a fresh lease of another owner and stops with a message
# naming it; a lease whose heartbeat is older than LEASE_STALE (its run was killed), or whose owner was a process
# of this host that is gone, is taken over. On local
# disk the lease is created exclusively (O_EXCL), so two runs cannot both take it; an object store has no
# exclusive create, so there a run writes its lease and reads it back after LEASE_SETTLE seconds, and the one
# whose lease is still there goes on (the documented rule: one writer per stage prefix, checked at start).

LEASE = "_LEASE.json"
LEASE_RENEW, LEASE_STALE, LEASE_SETTLE = 20.0, 90.0, 2.0
_TOKEN = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
_HELD: dict[str, str] = {}  # lease path → stage name, held by this process
_RENEWER: threading.Thread | None = None
_LOCK = threading.Lock()


class StageBusy(ValueError):
    """Another live run is writing this stage."""


def _lease_record() -> dict:
    return {"owner": _TOKEN, "heartbeat": time.time()}


def _read_lease(path: str) -> dict | None:
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def _owner_gone(owner: str) -> bool:
    """Whether a lease's owner was a process of this host that no longer exists (a run killed a moment ago:
    its rerun need not wait for the heartbeat to go stale)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def take_lease(stage: StageDir) -> None:
    path = stage.path(LEASE)
    with _LOCK:
        if path in _HELD and (_read_lease(path) or {}).get("owner") == _TOKEN:
            return  # this process holds it already (a stage begun again after a failure)
        _HELD.pop(path, None)
    held = _read_lease(path)
    if held and held.get("owner") != _TOKEN and time.time() - held.get("heartbeat", 0) < LEASE_STALE \
            and not _owner_gone(held.get("owner", "")):
        raise StageBusy(f"[{stage.stage}] {stage.uri} is being written by another run ({held['owner']}, alive "
                        f"{time.time() - held['heartbeat']:.0f}s ago): wait for it to finish, or if that run is dead, "
                        f"delete {path} (a lease older than {LEASE_STALE:.0f}s is taken over by itself)")
    if storage.is_local(path):
        _take_local(stage, path, held)
    else:
        storage.write_json(path, _lease_record())
        time.sleep(LEASE_SETTLE)
        if (_read_lease(path) or {}).get("owner") != _TOKEN:
            raise StageBusy(f"[{stage.stage}] {stage.uri}: another run took this stage at the same time; one "
                            "writer per stage (run it again once the other has finished)")
    with _LOCK:
        _HELD[path] = stage.stage
    _start_renewer()


def _take_local(stage: StageDir, path: str, stale: dict | None) -> None:
    import json

    local = storage.local_path(path)
    if stale is not None:  # a dead run's lease: move it aside atomically; of two runs, one wins the rename
        aside = f"{local}.stale-{_TOKEN.replace(':', '-')}"
        try:
            os.rename(local, aside)
            os.remove(aside)
        except FileNotFoundError:
            pass
    try:
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        held = _read_lease(path) or {}
        raise StageBusy(f"[{stage.stage}] {stage.uri} is being written by another run ({held.get('owner')}): "
                        "wait for it to finish") from None
    with os.fdopen(fd, "w") as f:
        json.dump(_lease_record(), f)


def release_lease(stage: StageDir) -> None:
    path = stage.path(LEASE)
    with _LOCK:
        held = _HELD.pop(path, None)
    if held is not None and (_read_lease(path) or {}).get("owner") == _TOKEN:
        storage.delete(path)


def _renew() -> None:
    while True:
        time.sleep(LEASE_RENEW)
        with _LOCK:
            paths = list(_HELD)
        for path in paths:
            try:
                if (_read_lease(path) or {}).get("owner") == _TOKEN:
                    storage.write_json(path, _lease_record())
            except OSError:
                pass  # storage unreachable for a moment: the next renewal tries again


def _start_renewer() -> None:
    global _RENEWER
    with _LOCK:
        if _RENEWER is None or not _RENEWER.is_alive():
            _RENEWER = threading.Thread(target=_renew, name="synthset-lease", daemon=True)
            _RENEWER.start()


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
