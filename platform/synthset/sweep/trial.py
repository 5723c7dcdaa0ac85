"""The sweep's function trainable: one trial = its Students (Ray Train) and evaluation.

``run_trial(config, sweep=..., context=...)`` is what ``Tuner`` runs (Ray's current pattern: a
function that launches the stage work, each Student a ``TorchTrainer.fit()``; no Trainer is handed
to the Tuner). It rebuilds the trial's validated pipeline config from its Tune ``config`` (the grid
point and the seed), finds the shared stages done (``sweep/shared.py``; the stage cache makes every
upstream call a read of ``_SUCCESS.json``), trains its Students in the order that puts the sweep's
metric first, and reports to Tune after each Student and after the evaluation — so ASHA can stop a
trial after its first Student. Each report holds every metric so far; the last is the trial's result.

MLflow: a child run of the sweep's parent run (``parent_run_id``), tagged with the Tune trial id
(a trial restarted by ``Tuner.restore`` continues its run), the stage runs nested in it. Paths are
absolute (Tune runs trials in their own working directories). Each start and finish is also
appended to ``<sweep dir>/trials.jsonl`` (the resume test reads it).

A finished trial writes its last result to ``<sweep dir>/trials/<trial id>.json``. Tune saves its own
experiment state only every few seconds, so a driver killed just after a trial returned restores that
trial as unfinished and starts it again; the restarted trial finds its result file, reports it and
returns without training anything (a ``reused`` event, not a ``start``).
"""

from __future__ import annotations

import json
import os
import time

from synthset import storage


def _log_event(sweep_dir: str, event: dict) -> None:
    """Append one JSON line to ``trials.jsonl`` (local sweep dirs; a remote store keeps Tune's own records)."""
    if storage.is_local(sweep_dir):
        with open(os.path.join(storage.local_path(sweep_dir), "trials.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")


def _child_run(tracker, parent_run_id: str | None, trial_id: str, params: dict):
    """Start (or continue, after a restore) the trial's MLflow run under the sweep's parent run."""
    import mlflow

    found = mlflow.search_runs(filter_string=f"tags.`synthset.trial_id` = '{trial_id}'"
                               + (f" and tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""),
                               output_format="list", max_results=1)
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    run = mlflow.start_run(run_name=f"trial-{trial_id}", parent_run_id=parent_run_id,
                           tags={"synthset.trial_id": trial_id, "synthset.job": "sweep-trial"})
    mlflow.log_params({f"sweep.{k}": str(v) for k, v in params.items()})
    from synthset.tracking import flatten

    mlflow.log_params(flatten(tracker.cfg.to_dict()))
    return run


def _own_seconds(summary: dict) -> float:
    return 0.0 if summary.get("reused") else float(summary.get("seconds", 0.0))


def lira_auc(metrics: dict, labels: str) -> float | None:
    """The Student's LiRA AUC: the highest over shadow modes and LiRA variants (as the export gate reads it)."""
    prefix = f"lira_student_{labels}_"
    values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith("_auc")]
    return max(values) if values else None


def _result_path(sweep_dir: str, trial_id: str) -> str:
    return storage.join(sweep_dir, "trials", f"{trial_id}.json")


def run_trial(config: dict, sweep: dict, context: dict) -> None:
    """One trial. ``config``: Tune's (grid point + ``seed``); ``sweep``: ``SweepFile.to_dict()``;
    ``context``: {"output_root", "sweep_dir", "parent_run_id", "base_images_per_class"} from the driver."""
    import ray.tune

    from synthset.stages.classifier import run_student
    from synthset.stages.evaluate import run_evaluate, student_training_set
    from synthset.stages.synthesize import label_dir
    from synthset.sweep.spec import SweepFile, Trial, trial_config, trial_overrides
    from synthset.tracking import Tracker

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    done = _result_path(context["sweep_dir"], trial_id)
    if storage.exists(done):  # finished before the driver died, after Tune's last save of its state
        saved = storage.read_json(done)
        if saved.get("config") == config:
            _log_event(context["sweep_dir"], {"event": "reused", "trial_id": trial_id, "config": config, "time": t0})
            ray.tune.report(saved["result"])
            return
    spec = SweepFile.from_dict(sweep)
    params = {k: v for k, v in config.items() if k != "seed"}
    trial = Trial(params, int(config["seed"]),
                  trial_overrides(spec, context["base_images_per_class"], params, int(config["seed"])))
    cfg = trial_config(spec, trial, context["output_root"])
    _log_event(context["sweep_dir"], {"event": "start", "trial_id": trial_id, "config": config, "time": t0})
    label = label_dir(cfg)
    if not label.is_complete():
        raise RuntimeError(f"trial {trial_id}: the shared stages did not label {label.uri}; run the sweep driver")
    label = label.summary()
    metric = spec.spec.metric
    order = sorted(cfg.student.labels, key=lambda l: metric != f"student_{l}_accuracy")
    tracker = Tracker(cfg)
    result: dict = {"images": label["num_samples"], "images_per_class": cfg.synthesis.images_per_class,
                    "method": cfg.synthesis.method, "trial_started_at": t0}
    stage_seconds = 0.0

    def report(stage: str, summary: dict) -> None:
        nonlocal stage_seconds
        stage_seconds += _own_seconds(summary)
        result["stages_done"] = result.get("stages_done", 0) + 1
        result.update({"stage": stage, "stages_total": len(order) + int(cfg.evaluate.enabled), "trial_stage_seconds": stage_seconds, "trial_seconds": time.time() - t0})
        ray.tune.report(dict(result))
        if tracker.enabled:
            tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})

    run = _child_run(tracker, context.get("parent_run_id"), trial_id, config) if tracker.enabled else None
    try:
        if run is not None:
            tracker.parent = run
        train_set = student_training_set(cfg, label["dataset"], True, tracker)  # done by the driver: a read
        for labels in order:
            student = run_student(cfg, train_set, labels, tracker)
            result[f"student_{labels}_accuracy"] = float(student["test_accuracy"])
            report(f"student-{labels}", student)
        if cfg.evaluate.enabled:
            evaluation = run_evaluate(cfg, True, tracker)
            for key in ("gen_fid", "gen_kid", "gen_precision", "gen_recall", "gen_density", "gen_coverage",
                        "replication_rate", "cardinality"):
                if key in evaluation:
                    result[key] = evaluation[key]
            for labels in cfg.student.labels:
                auc = lira_auc(evaluation, labels)
                if auc is not None:
                    result[f"lira_student_{labels}_auc"] = auc
            report("evaluate", evaluation)
    finally:
        if run is not None:
            import mlflow

            mlflow.end_run()
            tracker.parent = None
    storage.write_json(done, {"config": config, "result": dict(result)})  # after the last report: complete
    _log_event(context["sweep_dir"], {"event": "finish", "trial_id": trial_id, "config": config, "time": time.time(),
                                      "trial_stage_seconds": stage_seconds, "trial_seconds": time.time() - t0})
