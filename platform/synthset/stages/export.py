"""The privacy-gated export: publish a config's synthetic dataset only when its privacy checks pass.

``run_export`` reads what the earlier stages recorded for the same config — the replication gate's
summary (``<output.root>/replication/<hash>/_SUCCESS.json``: copies, dropped, and ``dataset``, the
dataset the Students trained on) and, when a LiRA threshold is set, the evaluation's
``metrics.json`` (``lira.targets``: every Student's LiRA results) — and turns them into a verdict
with ``eval/release.py: release_verdict`` (thresholds ``privacy.max_auc`` and
``privacy.max_tpr_at_0_1pct_fpr``).

* pass: the dataset's shards are copied (checked against the source manifest's sha256, one shard at
  a time, a rerun skips copied shards) to ``privacy.export_to`` (default
  ``<output.root>/export/<hash>/data``) with their ``_shards/`` stats, and ``manifest.json`` — the
  source's, plus ``release`` (the verdict), ``source`` and this stage's ``config_hash`` — is written
  last, which is what marks the published dataset complete.
* fail: nothing is written at the destination; the verdict is in ``<output.root>/export/<hash>/verdict.json``.

The stage directory is hashed by the evaluation's stage policy (``stage_hash(cfg, "evaluate")``, which
covers everything upstream) with the thresholds and destination as its extra. Inputs are checked
before any copy (``check_export_inputs``): a bad setting or a missing record fails naming the field or
file. No Ray: the step reads two records and copies files. ``jobs/export.py`` runs it.
"""

from __future__ import annotations

import hashlib
import time

from synthset import storage
from synthset.config import Config, stage_hash
from synthset.stages.common import SUCCESS, StageDir, output_root


def export_dir(cfg: Config) -> StageDir:
    p = cfg.privacy
    h = stage_hash(cfg, "evaluate", extra={"export": {"max_auc": p.max_auc, "export_to": p.export_to,
                                                      "max_tpr_at_0_1pct_fpr": p.max_tpr_at_0_1pct_fpr}})
    return StageDir("export", h, storage.join(output_root(cfg), "export", h))


def export_destination(cfg: Config) -> str:
    """Where a passing dataset is published: ``privacy.export_to``, or ``<export stage>/data``."""
    return cfg.privacy.export_to or export_dir(cfg).path("data")


def _lira_thresholds(cfg: Config) -> list[str]:
    return [f"privacy.{k}" for k in ("max_auc", "max_tpr_at_0_1pct_fpr") if getattr(cfg.privacy, k) is not None]


def check_config(cfg: Config) -> None:
    """What the config alone can tell: the export needs the replication gate, and a LiRA threshold needs
    LiRA on the Student, which needs the holdout as known non-members. Raises ``ValueError`` naming the field."""
    if not cfg.replication.enabled:
        raise ValueError("replication.enabled: false, but the export publishes only a dataset the replication gate "
                         "has checked; set replication.enabled=true")
    lira = _lira_thresholds(cfg)
    if lira and not cfg.privacy.enabled:
        raise ValueError(f"{lira[0]}: a LiRA threshold needs the Student's LiRA results, but privacy.enabled is "
                         "false; set privacy.enabled=true and run jobs/evaluate.py")
    if lira and cfg.data.splits.holdout == 0:
        raise ValueError(f"{lira[0]}: LiRA on the Student needs known non-members, but data.splits.holdout is 0; "
                         "set data.splits.holdout > 0")


def check_export_inputs(cfg: Config) -> dict:
    """Every check that needs no copying, in order: the config, the replication record, the LiRA
    results (when a threshold is set), the source manifest and the destination.

    Returns ``{"replication": gate summary, "student_lira": Student LiRA rows or None, "source":
    dataset, "manifest": its manifest}``. Raises ``ValueError`` / ``FileNotFoundError`` naming the
    field or file.
    """
    from synthset.data.shards import MANIFEST, read_manifest
    from synthset.eval.release import student_lira_results
    from synthset.stages.evaluate import evaluate_dir, replication_dir

    check_config(cfg)
    rep = replication_dir(cfg)
    if not rep.is_complete():
        raise FileNotFoundError(f"{rep.path(SUCCESS)}: the replication gate has not run for this config; run "
                                "jobs/evaluate.py (or jobs/pipeline.py) first")
    replication = rep.summary()
    student_lira = None
    if _lira_thresholds(cfg):
        ev = evaluate_dir(cfg)
        if not ev.is_complete():
            raise FileNotFoundError(f"{ev.path(SUCCESS)}: no evaluation (with the Student's LiRA) for this config; "
                                    "run jobs/evaluate.py first")
        metrics_file = ev.summary()["metrics"]
        metrics = storage.read_json(metrics_file)
        if "lira" not in metrics:
            raise ValueError(f"{metrics_file}: no 'lira' results (privacy.enabled with a holdout writes them)")
        student_lira = student_lira_results(metrics["lira"])
        if not student_lira:
            raise ValueError(f"{metrics_file}: 'lira' has no Student target")
    source = replication["dataset"]
    manifest = read_manifest(source)
    dest = export_destination(cfg)
    if storage.exists(storage.join(dest, MANIFEST)):
        there = storage.read_json(storage.join(dest, MANIFEST))
        if there.get("config_hash") != export_dir(cfg).hash:
            raise ValueError(f"privacy.export_to: {storage.join(dest, MANIFEST)} already holds another dataset "
                             f"(config hash {there.get('config_hash')}, source {there.get('source')}); choose an "
                             "empty destination")
    return {"replication": replication, "student_lira": student_lira, "source": source, "manifest": manifest}


def _shard_stats(dataset: str, shard: str) -> dict:
    uri = storage.join(dataset, "_shards", shard + ".json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: the shard's stats file is missing (the dataset was not written by synthset)")
    return storage.read_json(uri)


def publish_dataset(source: str, dest: str, meta: dict, resume: bool = True) -> dict:
    """Copy the shards of ``source`` to ``dest`` (sha256 checked against its manifest; with ``resume``,
    shards already there with the same sha256 are skipped), then write ``dest``'s manifest: the source
    manifest's fields updated with ``meta``. Returns the new manifest."""
    from synthset.data.shards import completed_shards, read_manifest, write_manifest

    src = read_manifest(source)
    done = completed_shards(dest) if resume else {}
    stats = []
    for entry in src["shards"]:
        st = _shard_stats(source, entry["shard"])
        if done.get(st["index"], {}).get("sha256") == entry["sha256"]:
            stats.append(done[st["index"]])
            continue
        data = storage.read_bytes(storage.join(source, entry["shard"]))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{storage.join(source, entry['shard'])}: sha256 differs from {source}/manifest.json "
                             "(the shard changed or is corrupt); nothing was published")
        storage.write_bytes(storage.join(dest, entry["shard"]), data)
        storage.write_json(storage.join(dest, "_shards", entry["shard"] + ".json"), st)
        stats.append(st)
    kept = {k: v for k, v in src.items() if k not in ("schema_version", "shards", "num_samples", "totals_per_class",
                                                       "complete", "written_at")}
    manifest = write_manifest(dest, {**kept, **meta}, stats)
    if manifest["num_samples"] != src["num_samples"]:
        raise ValueError(f"{dest}: {manifest['num_samples']} samples published, the source has {src['num_samples']}")
    return manifest


def run_export(cfg: Config, resume: bool = True, tracker=None) -> dict:
    """Decide, and publish when the verdict passes; returns the summary (``passed``, ``verdict``, ``dataset``).

    ``dataset`` is the published dataset, or None when the verdict fails (then nothing is written at
    the destination). A passing export that is complete (stage and destination manifest) is reused.
    """
    from synthset.eval.release import release_verdict

    check_config(cfg)
    stage, dest = export_dir(cfg), export_destination(cfg)
    if resume and stage.is_complete() and storage.exists(storage.join(dest, "manifest.json")):
        return stage.reuse(dest)
    inputs = check_export_inputs(cfg)
    t0 = time.time()
    p = cfg.privacy
    verdict = release_verdict(inputs["replication"], inputs["student_lira"], p.max_auc, p.max_tpr_at_0_1pct_fpr)
    verdict = {**verdict, "stage_hash": stage.hash, "source": inputs["source"], "decided_at": time.time()}
    stage.begin(cfg)
    storage.write_json(stage.path("verdict.json"), verdict)
    lines = [f"  {name}: {c['measured']} (threshold {c['threshold']}) {'pass' if c['passed'] else 'FAIL'}"
             if c["checked"] else f"  {name}: {c['measured']} (not checked)" for name, c in verdict["checks"].items()]
    print(f"[export] privacy gate {'passed' if verdict['passed'] else 'FAILED'}:\n" + "\n".join(lines))
    summary = {"passed": verdict["passed"], "failed": verdict["failed"], "verdict": stage.path("verdict.json"),
               "source": inputs["source"], "dataset": None}
    if verdict["passed"]:
        manifest = publish_dataset(inputs["source"], dest,
                                   {"config_hash": stage.hash, "source": inputs["source"], "release": verdict}, resume)
        summary = stage.complete({**summary, "dataset": dest, "num_samples": manifest["num_samples"],
                                  "seconds": time.time() - t0})
        print(f"[export] published {manifest['num_samples']} samples to {dest}")
    else:
        print(f"[export] nothing published (destination {dest}); verdict: {stage.path('verdict.json')}")
    if tracker is not None:
        measured = {f"release_{k}": c["measured"] for k, c in verdict["checks"].items()
                    if isinstance(c["measured"], (int, float))}
        tracker.log_stage("export", cfg, metrics={"release_passed": int(verdict["passed"]), **measured},
                          params={"max_auc": p.max_auc, "max_tpr_at_0_1pct_fpr": p.max_tpr_at_0_1pct_fpr,
                                  "destination": dest},
                          artifacts=[storage.local_path(stage.path("verdict.json"))]
                          if storage.is_local(stage.uri) else [])
    return summary
