"""MLflow tracking: one parent run per pipeline (or job), one nested run per stage.

The tracking URI is ``tracking.uri``, else the ``MLFLOW_TRACKING_URI`` environment variable (how a
KubeRay pod gets it from a Secret), else a SQLite file under the run's output root (absolute,
because Ray Tune changes trial working directories). Credentials come only from the environment
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, read by
MLflow itself): a URI holding them is rejected, in the config and in the environment alike.
``tracking.enabled: false`` turns every call into a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from synthset.config import Config, uri_credentials
from synthset.stages.common import output_root


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite under a local output root."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _SET_HERE:
        problem = uri_credentials(env)
        if problem:
            raise ValueError(f"MLFLOW_TRACKING_URI: the URI holds {problem}; give credentials in "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        return env
    root = output_root(cfg)
    if "://" in root:
        raise ValueError("tracking.uri: output.root is remote, so set an MLflow server URI (tracking.uri or the "
                         "MLFLOW_TRACKING_URI environment variable)")
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


# ``mlflow.set_tracking_uri`` also exports the URI as MLFLOW_TRACKING_URI (for subprocesses); a later config in the
# same process (a benchmark, a test) must still get its own store, not the one an earlier Tracker exported.
_SET_HERE: set[str] = set()


def artifact_location(cfg: Config) -> str:
    """Where a new experiment keeps its artifacts: ``<output.root>/mlartifacts`` (a URI for an object store)."""
    root = output_root(cfg)
    return root.rstrip("/") + "/mlartifacts" if "://" in root else "file://" + os.path.join(root, "mlartifacts")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:5000]
    return out


class Tracker:
    """``with Tracker(cfg).pipeline_run("pipeline"): ... tracker.log_stage(...)``."""

    def __init__(self, cfg: Config):
        self.enabled = cfg.tracking.enabled
        self.cfg = cfg
        self.uri = tracking_uri(cfg) if self.enabled else None
        self.parent = None
        if self.enabled:
            import mlflow

            if "://" not in output_root(cfg):
                os.makedirs(output_root(cfg), exist_ok=True)  # the default SQLite store lives there
            if os.environ.get("MLFLOW_TRACKING_URI") != self.uri:
                _SET_HERE.add(self.uri)
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                # Artifacts (grids, confusion matrices, reports) under output.root, not ./mlruns of wherever
                # the job started; a tracking server's experiment gets the same place unless it has one.
                mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg))
            mlflow.set_experiment(cfg.tracking.experiment)

    @contextmanager
    def pipeline_run(self, name: str):
        if not self.enabled:
            yield self
            return
        import mlflow

        from synthset.config import config_hash

        with mlflow.start_run(run_name=f"{self.cfg.run.name}-{name}") as run:
            self.parent = run
            mlflow.set_tags({"synthset.config_hash": config_hash(self.cfg.to_dict()), "synthset.job": name})
            mlflow.log_params(flatten(self.cfg.to_dict()))
            try:
                yield self
            finally:
                self.parent = None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_stage(self, stage: str, cfg: Config, metrics: dict | None = None, params: dict | None = None,
                  artifacts: list[str] | None = None) -> None:
        """A nested run for ``stage`` under the active parent (or a top-level run if none)."""
        if not self.enabled:
            return
        import mlflow

        with mlflow.start_run(run_name=stage, nested=self.parent is not None):
            mlflow.set_tag("synthset.stage", stage)
            if params:
                mlflow.log_params(flatten(params))
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            for path in artifacts or []:
                if os.path.exists(path):
                    mlflow.log_artifact(path)
