"""The sweep file (``conf/sweep*.yaml``): schema, the grid of trials, and validation before any trial.

A sweep file holds one top-level ``sweep:`` section::

    sweep:
      name: quickstart-cardinality
      config: quickstart.yaml            # the pipeline config every trial starts from (relative to this file)
      set: ["student.labels=[soft]"]     # overrides for every trial
      space:                             # the grid: every combination is a trial
        cardinality: [0.25, 0.5, 1]      # × the base synthesis.images_per_class (prefixes of one plan)
        synthesis.fusion.lam: [0.5, 1.0] # any dotted config path → its values
        fusion:                          # a named dimension whose values set several fields
          - {name: "Beta(10,10)", set: {synthesis.fusion.beta_alpha: 10}}
      seeds: {fields: [student.seed], values: [0, 1]}   # replicates: error bars are over these
      metric: student_soft_accuracy
      mode: max
      scheduler: {type: fifo}            # or asha (stops a trial after its first Student)

``load_sweep`` validates the file (unknown keys, empty dimensions, bad types: ``ValueError`` naming
``sweep.<field>``); ``expand_trials`` lists the trials (grid in file order, then seeds);
``trial_configs`` loads every trial's pipeline config with ``synthset.config.load_config`` and its
overrides, so an unknown key or an out-of-range value (λ outside [0, 1]) fails before any trial starts
with the field's path, and rejects trials that would train the very same Students.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import synthset.methods  # noqa: F401  (registers the methods a trial config may name)
from synthset.config import Config, config_hash, load_config, parse_override, stage_hash

CARDINALITY = "cardinality"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedsSpec(_Section):
    fields: list[str] = Field(["student.seed"], min_length=1, description="Config paths every seed value is "
                              "written to (student.seed: replicate the Student only; add run.seed to also "
                              "replicate generation, which then runs once per seed).")
    values: list[int] = Field([0], min_length=1, description="The seeds; every grid point runs once per seed.")


class SchedulerSpec(_Section):
    type: Literal["fifo", "asha"] = Field("fifo", description="fifo: every trial runs all its stages; asha: "
                                          "ASHA stops a trial whose metric after its first Student is in the "
                                          "bottom of its rung (its second Student and evaluation/LiRA are skipped).")
    grace_period: int = Field(1, ge=1, description="asha: reports (stages) before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="asha: 1/reduction_factor of the trials go on per rung.")


class CompoundValue(_Section):
    name: str = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1, description="dotted config path → value")


class SweepSpec(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    config: str = Field(min_length=1, description="The pipeline config of every trial; relative to the sweep file.")
    set: list[str] = Field([], description="Overrides (key.path=value) applied to every trial.")
    space: dict[str, list[Any]] = Field(min_length=1, description="dimension → values; the grid is their product.")
    seeds: SeedsSpec = SeedsSpec()
    metric: str = Field("student_soft_accuracy", min_length=1, description="Reported to Tune; ASHA and the best "
                        "trial use it (student_<labels>_accuracy or any metric a trial reports).")
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster's CPUs/GPUs "
                                              "hold Students (student.num_workers × cpus_per_worker each).")

    @field_validator("space")
    @classmethod
    def _dimensions(cls, space: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for dim, values in space.items():
            if not values:
                raise ValueError(f"{dim}: no values")
            if dim == CARDINALITY:
                bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]
                if bad:
                    raise ValueError(f"{dim}: multiples of synthesis.images_per_class must be numbers > 0 (got {bad})")
            elif all(isinstance(v, dict) for v in values):
                for i, v in enumerate(values):
                    try:
                        CompoundValue.model_validate(v)
                    except ValidationError as err:
                        e = err.errors()[0]
                        raise ValueError(f"{dim}[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
                names = [v["name"] for v in values]
                if len(set(names)) != len(names):
                    raise ValueError(f"{dim}: repeated names {names}")
            else:
                if any(isinstance(v, dict) for v in values):
                    raise ValueError(f"{dim}: mixes mappings ({{name, set}}) and plain values")
                if any(not p for p in dim.split(".")):
                    raise ValueError(f"{dim}: not a dotted config path")
            labels = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(labels)) != len(labels):
                raise ValueError(f"{dim}: repeated values {values}")
        return space

    def is_compound(self, dim: str) -> bool:
        return dim != CARDINALITY and all(isinstance(v, dict) for v in self.space[dim])

    def labels(self, dim: str) -> list[Any]:
        """The values of ``dim`` as Tune sees them (a compound value by its name)."""
        return [v["name"] for v in self.space[dim]] if self.is_compound(dim) else list(self.space[dim])


@dataclass
class SweepFile:
    """A loaded sweep: the spec, the base pipeline config's path, the overrides of every trial."""

    spec: SweepSpec
    path: str
    base_config: str
    overrides: list[str] = field(default_factory=list)  # spec.set + the command line's --set

    def to_dict(self) -> dict:
        return {"spec": self.spec.model_dump(mode="json"), "path": self.path, "base_config": self.base_config,
                "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepFile":
        return cls(SweepSpec.model_validate(d["spec"]), d["path"], d["base_config"], list(d["overrides"]))


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep (a top-level ``sweep:`` section) rather than a pipeline config."""
    loaded = yaml.safe_load(Path(path).read_text())
    return isinstance(loaded, dict) and "sweep" in loaded


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid sweep ({source}):"]
    for e in err.errors():
        path = ".".join(["sweep", *map(str, e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key")
        else:
            got = e.get("input")
            got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            if tuple(e["loc"]) == ("space",) and ": " in msg:  # the validator names the dimension first
                dim, msg = msg.split(": ", 1)
                path, got = f"{path}.{dim}", ""
            lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def load_sweep(path: str | Path, sweep_overrides: list[str] | None = None,
               config_overrides: list[str] | None = None) -> SweepFile:
    """Read and validate a sweep file; ``sweep_overrides`` ("max_concurrent_trials=1") edit its ``sweep:``
    section, ``config_overrides`` ("output.root=/data/runs") every trial's pipeline config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or set(raw) != {"sweep"} or not isinstance(raw["sweep"], dict):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"invalid sweep ({path}): the file must hold exactly one mapping, 'sweep:' (got {keys})")
    section = raw["sweep"]
    for item in sweep_overrides or []:
        keys, value = parse_override(item)
        node = section
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--sweep-set {item!r}: sweep.{'.'.join(keys[:-1])} is not a section")
        node[keys[-1]] = value
    try:
        spec = SweepSpec.model_validate(section)
    except ValidationError as err:
        raise ValueError(_format(err, str(path))) from None
    base = (path.parent / spec.config).resolve()
    if not base.is_file():
        raise FileNotFoundError(f"sweep.config: {base} not found (relative to {path})")
    return SweepFile(spec, str(path.resolve()), str(base), [*spec.set, *(config_overrides or [])])


@dataclass
class Trial:
    """One grid point × seed: ``params`` (dimension → value as Tune shows it), the seed, its overrides."""

    params: dict[str, Any]
    seed: int
    overrides: list[str]

    @property
    def tune_config(self) -> dict[str, Any]:
        return {**self.params, "seed": self.seed}


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: load_config parses it back to the same value


def trial_overrides(sweep: SweepFile, base_images_per_class: int, params: dict[str, Any], seed: int) -> list[str]:
    """The overrides of the trial with Tune config ``params`` (+ ``seed``), after the sweep's own."""
    spec, out = sweep.spec, []
    for dim, value in params.items():
        if dim == CARDINALITY:
            images = max(1, round(base_images_per_class * value))
            out.append(_override("synthesis.images_per_class", images))
        elif spec.is_compound(dim):
            chosen = next(v for v in spec.space[dim] if v["name"] == value)
            out += [_override(k, v) for k, v in chosen["set"].items()]
        else:
            out.append(_override(dim, value))
    out += [_override(f, seed) for f in spec.seeds.fields]
    return out


def base_config(sweep: SweepFile) -> Config:
    """The pipeline config every trial starts from (the sweep's overrides applied)."""
    try:
        return load_config(sweep.base_config, sweep.overrides)
    except ValueError as err:
        raise ValueError(f"sweep.config / sweep.set: {err}") from None


def expand_trials(sweep: SweepFile, base: Config | None = None) -> list[Trial]:
    """Every trial of the grid (dimensions in file order, the last varying fastest), then each seed."""
    base = base or base_config(sweep)
    spec = sweep.spec
    dims = list(spec.space)
    out = []
    for combo in itertools.product(*(spec.labels(d) for d in dims)):
        params = dict(zip(dims, combo))
        for seed in spec.seeds.values:
            out.append(Trial(params, seed, trial_overrides(sweep, base.synthesis.images_per_class, params, seed)))
    return out


def trial_config(sweep: SweepFile, trial: Trial, output_root: str | None = None) -> Config:
    """A trial's validated pipeline config; ``output_root`` (absolute) replaces ``output.root``."""
    extra = [f"output.root={output_root}"] if output_root else []
    return load_config(sweep.base_config, [*sweep.overrides, *trial.overrides, *extra])


def _student_identity(cfg: Config) -> tuple:
    """What a trial trains: its Students' and its evaluation's stage hashes."""
    return (tuple(stage_hash(cfg, "student", labels) for labels in cfg.student.labels),
            stage_hash(cfg, "evaluate") if cfg.evaluate.enabled else None)


def trial_configs(sweep: SweepFile, output_root: str | None = None) -> list[tuple[Trial, Config]]:
    """Every trial with its validated config, before any work; ``ValueError`` names the field at fault.

    Rejects, besides what ``load_config`` rejects, a cardinality that rounds two multiples to the same
    image count, and trials that would train the very same Students (a dimension the method does not
    read, e.g. ``synthesis.fusion.lam`` under ``class_prompt``).
    """
    base = base_config(sweep)
    out, seen = [], {}
    for trial in expand_trials(sweep, base):
        try:
            cfg = trial_config(sweep, trial, output_root)
        except ValueError as err:
            where = ", ".join(f"{k}={v}" for k, v in trial.tune_config.items())
            raise ValueError(f"sweep.space: the trial {where} has an invalid config:\n{err}") from None
        identity = _student_identity(cfg)
        if identity in seen:
            other = seen[identity]
            differ = sorted(k for k in trial.tune_config if trial.tune_config[k] != other.tune_config.get(k))
            raise ValueError(f"sweep.space: {', '.join(differ)} do not change what the trials train "
                             f"({other.tune_config} and {trial.tune_config} train the same Students, e.g. a "
                             f"setting that synthesis.method={cfg.synthesis.method!r} does not read)")
        seen[identity] = trial
        out.append((trial, cfg))
    return out


def sweep_hash(configs: list[Config]) -> str:
    """Names the sweep's Tune experiment: a changed grid is a new experiment, not a restore of another."""
    return config_hash(sorted(config_hash({k: v for k, v in c.to_dict().items() if k not in ("output", "tracking", "ray")})
                              for c in configs))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
