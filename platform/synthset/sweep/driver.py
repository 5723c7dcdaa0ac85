"""The sweep driver: validate every trial, run the shared stages once, then Ray Tune over the trials.

``run_sweep(sweep)``:

1. loads every trial's pipeline config (``spec.trial_configs``): a bad field fails here, before Ray
   starts or anything is written; then the data and the method's needs are checked
   (``pipeline.validate_inputs``);
2. starts (or joins) Ray and opens the sweep's MLflow parent run (kept in ``parent_run.json``, so a
   restored sweep continues it);
3. runs the shared stages (``sweep/shared.py``): generation once per generator setting, smaller
   cardinalities as prefixes, labels and the replication gate once per stage hash;
4. runs the trials with ``Tuner`` (``sweep/trial.py``'s function trainable; each trial reserves no CPU,
   its Students' Ray Train workers do; ``max_concurrent_trials`` from the cluster's resources unless the
   sweep sets it; ASHA when ``scheduler.type: asha``), or, when the experiment exists, resumes it with
   ``Tuner.restore``: finished trials are kept, unfinished and errored ones run again (their finished
   stages are reused from the stage cache);
5. writes the table and plots (``sweep/report.py``) and ``sweep.json`` (wall time, the shared stages'
   and the trials' own stage seconds, overhead = wall ÷ their sum).

Everything lives under ``<output.root>/sweeps/<name>-<sweep hash>/`` (absolute: Tune runs trials in their
own working directories); the Tune experiment is its ``tune/`` folder. ``Tuner.restore`` unpickles the
experiment state it wrote there, so the output root must be trusted storage (as for every stage).
"""

from __future__ import annotations

import json
import os
import time

from synthset import storage
from synthset.config import Config, stage_hash
from synthset.sweep.spec import SweepFile, sweep_hash, trial_configs

TRIAL_MEMORY_BYTES = 256 * 1024 * 1024  # what a trial's own process reserves (not a CPU: its Students need them)


def trial_cpus(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) a trial holds while it trains: one Student at a time, its Ray Train workers."""
    s = cfg.student
    return float(s.num_workers * s.cpus_per_worker), float(s.num_workers if s.use_gpu else 0)


def concurrent_trials(configs: list[Config], resources: dict) -> int:
    """How many trials the cluster's ``resources`` run at once (at least 1)."""
    cpus = max(trial_cpus(c)[0] for c in configs)
    gpus = max(trial_cpus(c)[1] for c in configs)
    n = int(resources.get("CPU", 1) // cpus) if cpus else 1
    if gpus:
        n = min(n, int(resources.get("GPU", 0) // gpus))
    return max(1, n)


def sweep_dir(sweep: SweepFile, configs: list[Config]) -> str:
    from synthset.stages.common import output_root

    return storage.join(output_root(configs[0]), "sweeps", f"{sweep.spec.name}-{sweep_hash(configs)}")


def _absolute_root(sweep: SweepFile) -> str:
    from synthset.stages.common import output_root
    from synthset.sweep.spec import base_config

    return output_root(base_config(sweep))


def describe_sweep(sweep: SweepFile) -> dict:
    """The dry run: trials, the generation plan (what is generated, what is a prefix), concurrency, where."""
    import os as _os

    from synthset.sweep.shared import generation_groups

    pairs = trial_configs(sweep, _absolute_root(sweep))
    configs = [c for _, c in pairs]
    cfg = configs[0]
    cpus = cfg.ray.num_cpus or _os.cpu_count() or 1
    groups = generation_groups(configs)
    classes = len(cfg.data.class_names) if cfg.data.class_names else None
    return {
        "sweep": sweep.spec.name, "dir": sweep_dir(sweep, configs), "trials": len(pairs),
        "dimensions": {d: sweep.spec.labels(d) for d in sweep.spec.space},
        "seeds": sweep.spec.seeds.model_dump(),
        "generation": [{"generator": key, "method": g["config"].synthesis.method,
                        "images_per_class": g["images_per_class"], "prefixes_per_class": g["prefixes"],
                        "synthesis_hash": stage_hash(g["config"], "synthesis")} for key, g in groups.items()],
        "students_per_trial": len(cfg.student.labels), "evaluate": cfg.evaluate.enabled,
        "privacy": cfg.privacy.enabled and cfg.evaluate.enabled, "classes": classes,
        "max_concurrent_trials": sweep.spec.max_concurrent_trials or concurrent_trials(configs, {"CPU": cpus}),
        "scheduler": sweep.spec.scheduler.model_dump(),
        "trial_configs": [{**t.tune_config, "overrides": t.overrides} for t, _ in pairs],
    }


def format_description(d: dict) -> str:
    lines = ["=== sweep plan (dry run: nothing was run) ===",
             f"sweep:       {d['sweep']} → {d['dir']}",
             f"trials:      {d['trials']} ({' × '.join(f'{k} {len(v)}' for k, v in d['dimensions'].items())} "
             f"× seeds {len(d['seeds']['values'])})",
             f"generation:  {len(d['generation'])} run(s), once per generator setting"]
    for g in d["generation"]:
        lines.append(f"  {g['method']} {g['synthesis_hash']}: {g['images_per_class']} per class generated; "
                     f"prefixes {g['prefixes_per_class'] or 'none'}")
    lines += [f"per trial:   {d['students_per_trial']} Student(s)" + (", evaluation" if d["evaluate"] else "")
              + (" with LiRA" if d["privacy"] else ""),
              f"concurrency: {d['max_concurrent_trials']} trial(s) at once; scheduler {d['scheduler']['type']}"]
    return "\n".join(lines)


def _parent_run(tracker, sdir: str, name: str):
    """The sweep's MLflow parent run: the one recorded in ``parent_run.json``, else a new one."""
    import mlflow

    record = storage.join(sdir, "parent_run.json")
    if storage.exists(record):
        run_id = storage.read_json(record)["run_id"]
        try:
            return mlflow.start_run(run_id=run_id)
        except Exception as err:  # a new tracking store: start a new parent run
            print(f"[sweep] MLflow parent run {run_id} not found ({str(err)[:120]}): starting a new one")
    run = mlflow.start_run(run_name=f"sweep-{name}", tags={"synthset.job": "sweep", "synthset.sweep_dir": sdir})
    storage.write_json(record, {"run_id": run.info.run_id, "tracking_uri": tracker.uri})
    return run


def _check_inputs(configs: list[Config]) -> list[str]:
    """``pipeline.validate_inputs`` once per distinct (data, method, adaptation): the class names."""
    from synthset.pipeline import validate_inputs

    names, seen = None, set()
    for cfg in configs:
        key = json.dumps([stage_hash(cfg, "prepare"), cfg.synthesis.method, cfg.adapt.model_dump(),
                          cfg.synthesis.fusion.model_dump()], sort_keys=True)
        if key not in seen:
            seen.add(key)
            names = validate_inputs(cfg)
    return names


def _results(grid) -> list[dict]:
    out = []
    for r in grid:
        metrics = dict(r.metrics or {})
        if r.error is not None:
            status = "error"
        elif not metrics.get("stages_total"):  # no report: the sweep was interrupted before its first stage ended
            status = "unfinished"
        elif metrics["stages_done"] < metrics["stages_total"]:  # ASHA stopped it (or the sweep was interrupted)
            status = "stopped early"
        else:
            status = "done"
        out.append({"config": dict(r.config or {}), "metrics": metrics, "status": status,
                    "trial_id": metrics.get("trial_id")})
    return out


def run_sweep(sweep: SweepFile, resume: bool = True) -> dict:
    """Run (or resume) the sweep; returns ``sweep.json``'s content (see the module docstring)."""
    t0 = time.time()
    pairs = trial_configs(sweep, _absolute_root(sweep))  # every trial validated before any work
    configs = [c for _, c in pairs]
    cfg = configs[0]
    class_names = _check_inputs(configs)
    sdir = sweep_dir(sweep, configs)
    storage.makedirs(sdir)
    storage.write_json(storage.join(sdir, "sweep.yaml.json"), sweep.to_dict())

    import mlflow
    import ray
    from ray import tune

    from synthset.stages.common import init_ray, output_root
    from synthset.sweep.report import trial_rows, write_plots, write_tables
    from synthset.sweep.shared import run_shared_stages
    from synthset.sweep.trial import run_trial
    from synthset.tracking import Tracker

    init_ray(cfg)
    tracker = Tracker(cfg)
    parent = _parent_run(tracker, sdir, sweep.spec.name) if tracker.enabled else None
    try:
        tracker.parent = parent
        if parent is not None:  # a resumed sweep keeps the first invocation's (a Ray job unpacks its files anew)
            logged = mlflow.get_run(parent.info.run_id).data.params
            mlflow.log_params({k: v for k, v in {"sweep.name": sweep.spec.name, "sweep.file": sweep.path,
                                                 "sweep.trials": len(pairs), "sweep.dir": sdir}.items()
                               if k not in logged})
        t_shared = time.time()
        shared = run_shared_stages(configs, class_names, tracker)
        shared_wall = time.time() - t_shared
        spec = sweep.spec
        limit = spec.max_concurrent_trials or concurrent_trials(configs, ray.cluster_resources())
        context = {"output_root": output_root(cfg), "sweep_dir": sdir,
                   "parent_run_id": parent.info.run_id if parent is not None else None,
                   "base_images_per_class": _base_images_per_class(sweep)}
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep.to_dict(), context=context),
                                        {"CPU": 0, "memory": TRIAL_MEMORY_BYTES})
        experiment = storage.join(sdir, "tune")
        if not resume and storage.exists(experiment):
            storage.delete_dir_contents(experiment)
        if resume and tune.Tuner.can_restore(experiment):
            print(f"[sweep] resuming {experiment} (finished trials are kept)")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, restart_errored=True)
        else:
            space = {d: tune.grid_search(spec.labels(d)) for d in spec.space}
            space["seed"] = tune.grid_search(list(spec.seeds.values))
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec, cfg),
                                            max_concurrent_trials=limit),
                run_config=tune.RunConfig(name="tune", storage_path=sdir, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        print(f"[sweep] {len(pairs)} trials, up to {limit} at once → {experiment}")
        grid = tuner.fit()
        results = _results(grid)
        rows = trial_rows(spec, results)
        files = write_tables(spec, rows, sdir)
        plots = write_plots(spec, rows, sdir)
        # Overhead of this invocation: its wall over the stage seconds it ran (a resumed sweep's earlier trials
        # ran in an earlier invocation, whose wall is not this one's).
        ran_now = [r for r in results if float(r["metrics"].get("trial_started_at", 0.0)) >= t0]
        trial_seconds = sum(float(r["metrics"].get("trial_stage_seconds", 0.0)) for r in ran_now)
        shared_seconds = sum(shared["seconds"].values())
        wall = time.time() - t0
        done = sum(r["status"] == "done" for r in results)
        summary = {"sweep": spec.name, "dir": sdir, "experiment": experiment, "trials": len(pairs), "done": done,
                   "unfinished": len(pairs) - done - sum(r["status"] in ("stopped early", "error") for r in results),
                   "stopped_early": sum(r["status"] == "stopped early" for r in results),
                   "errors": sum(r["status"] == "error" for r in results),
                   "wall_seconds": wall, "shared_wall_seconds": shared_wall, "shared_stage_seconds": shared["seconds"],
                   "trial_stage_seconds": trial_seconds, "trials_run_now": len(ran_now),
                   "trial_stage_seconds_all": sum(float(r["metrics"].get("trial_stage_seconds", 0.0)) for r in results),
                   "overhead": wall / (trial_seconds + shared_seconds) if trial_seconds + shared_seconds > 0 else None,
                   "generation": shared["generation"], "max_concurrent_trials": limit,
                   "tables": files, "plots": plots, "mlflow_uri": tracker.uri,
                   "parent_run_id": parent.info.run_id if parent is not None else None}
        if not grid.errors and results:
            try:
                best = grid.get_best_result()
                summary["best"] = {"config": best.config, spec.metric: (best.metrics or {}).get(spec.metric)}
            except RuntimeError:
                pass
        storage.write_json(storage.join(sdir, "sweep.json"), summary)
        if parent is not None:
            tracker.log_metrics({"sweep_wall_seconds": wall, "sweep_trial_stage_seconds": trial_seconds,
                                 "sweep_shared_stage_seconds": shared_seconds,
                                 **({"sweep_overhead": summary["overhead"]} if summary["overhead"] else {})})
            for path in [*files.values(), *plots, storage.join(sdir, "sweep.json")]:
                if storage.is_local(path):
                    mlflow.log_artifact(storage.local_path(path))
    finally:
        if parent is not None:
            mlflow.end_run()
            tracker.parent = None
    return summary


def _base_images_per_class(sweep: SweepFile) -> int:
    from synthset.sweep.spec import base_config

    return base_config(sweep).synthesis.images_per_class


def _scheduler(spec, cfg: Config):
    if spec.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    reports = len(cfg.student.labels) + (1 if cfg.evaluate.enabled else 0)
    return ASHAScheduler(time_attr="training_iteration", max_t=max(reports, spec.scheduler.grace_period),
                         grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)


def format_sweep(summary: dict) -> str:
    lines = ["", "=== synthset sweep summary ===",
             f"Trials:        {summary['trials']} ({summary['done']} done, {summary['stopped_early']} stopped early, "
             f"{summary['errors']} errors, {summary['unfinished']} unfinished: rerun the command to resume), "
             f"up to {summary['max_concurrent_trials']} at once",
             f"Generation:    " + "; ".join(f"{g['images_per_class']}/class ({g['generated_now']} images generated now), "
                                          f"prefixes {g['prefixes'] or 'none'}" for g in summary["generation"]),
             f"Table:         {summary['tables']['summary_md']}",
             f"Plots:         {', '.join(summary['plots'])}",
             f"Tune:          {summary['experiment']}",
             f"MLflow store:  {summary['mlflow_uri']}",
             f"Wall:          {summary['wall_seconds']:.0f}s; shared stages {sum(summary['shared_stage_seconds'].values()):.0f}s, "
             f"trials' own stages {summary['trial_stage_seconds']:.0f}s"
             + (f"; overhead ×{summary['overhead']:.2f}" if summary["overhead"] else "")]
    if os.environ.get("SYNTHSET_SWEEP_PRINT_TABLE", "1") == "1" and storage.is_local(summary["tables"]["summary_md"]):
        lines += ["", open(storage.local_path(summary["tables"]["summary_md"])).read()]
    return "\n".join(lines)
