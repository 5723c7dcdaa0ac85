"""Sweeps (jobs/sweep.py, synthset/sweep/): validation before any trial, prefix datasets, the table's
statistics, and the real driver on conf/sweep_tiny.yaml — killed mid-way and resumed with Tuner.restore."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

from synthset.sweep.spec import load_sweep, trial_configs

TINY = ROOT / "conf" / "sweep_tiny.yaml"


def write_sweep(tmp_path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"sweep:\n  name: t\n  config: {ROOT / 'conf' / 'tiny.yaml'}\n{body}")
    return path


# --- the sweep file and each trial's config are validated before any work --------------------------------

@pytest.mark.parametrize("body,field", [
    ("  space: {synthesis.fusion.lamda: [0.5]}\n", "synthesis.fusion.lamda: unknown key"),
    ("  set: [synthesis.method=loft]\n  space: {synthesis.fusion.lam: [0.5, 1.5]}\n", "synthesis.fusion.lam"),
    ("  space: {cardinality: [1, -2]}\n", "sweep.space.cardinality"),
    ("  space: {cardinality: [1]}\n  spaces: {}\n", "sweep.spaces: unknown key"),
    ("  space: {cardinality: [1]}\n  seeds: {fields: [student.sead], values: [0]}\n", "student.sead: unknown key"),
    ("  space: {student.epochs: []}\n", "sweep.space"),
])
def test_a_bad_search_space_fails_naming_the_field(tmp_path, body, field):
    with pytest.raises(ValueError) as err:
        trial_configs(load_sweep(write_sweep(tmp_path, body)))
    assert field in str(err.value)
    if "1.5" in body:
        assert "less than or equal to 1" in str(err.value) and "synthesis.fusion.lam=1.5" in str(err.value)


def test_a_dimension_the_method_does_not_read_is_rejected(tmp_path):
    """ClassPrompt ignores synthesis.fusion: both λ trials would train the same Students."""
    with pytest.raises(ValueError, match="synthesis.fusion.lam do not change what the trials train"):
        trial_configs(load_sweep(write_sweep(tmp_path, "  space: {synthesis.fusion.lam: [0.5, 1.0]}\n")))


def test_the_cli_fails_before_any_work(tmp_path):
    path = write_sweep(tmp_path, "  set: [synthesis.method=loft]\n  space: {synthesis.fusion.lam: [0.5, 1.5]}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(path),
                           "--set", f"output.root={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "synthesis.fusion.lam" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_trials_expand_the_grid_with_compound_values_and_seeds(tmp_path):
    path = write_sweep(tmp_path, "  set: [synthesis.method=loft]\n  space:\n    cardinality: [1, 2]\n"
                       "    fusion:\n      - {name: half, set: {synthesis.fusion.lam: 0.5}}\n"
                       "      - {name: beta, set: {synthesis.fusion.beta_alpha: 10}}\n"
                       "  seeds: {fields: [student.seed, run.seed], values: [3, 4]}\n")
    pairs = trial_configs(load_sweep(path, config_overrides=[f"output.root={tmp_path}"]))
    assert len(pairs) == 8
    got = {(t.params["cardinality"], t.params["fusion"], t.seed): c for t, c in pairs}
    c = got[(2, "beta", 4)]
    assert c.synthesis.images_per_class == 12 and c.synthesis.fusion.beta_alpha == 10
    assert c.student.seed == 4 and c.run.seed == 4 and c.output.root == str(tmp_path)
    assert got[(1, "half", 3)].synthesis.fusion.lam == 0.5 and got[(1, "half", 3)].synthesis.images_per_class == 6


def test_concurrency_follows_the_students_resources_and_asha_stops_after_a_student(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from synthset.sweep.driver import _scheduler, concurrent_trials

    path = write_sweep(tmp_path, "  space: {cardinality: [1, 2]}\n  scheduler: {type: asha, reduction_factor: 3}\n")
    sweep = load_sweep(path, config_overrides=["student.labels=[soft, hard]", "student.cpus_per_worker=2"])
    configs = [c for _, c in trial_configs(sweep)]
    assert concurrent_trials(configs, {"CPU": 9}) == 4 and concurrent_trials(configs, {"CPU": 1}) == 1
    gpu = [c.model_copy(update={"student": c.student.model_copy(update={"use_gpu": True, "num_workers": 2})})
           for c in configs]
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 3}) == 1
    asha = _scheduler(sweep.spec, configs[0])
    assert isinstance(asha, ASHAScheduler)
    assert asha._max_t == 3 and asha._reduction_factor == 3  # 2 Students + the evaluation: three reports
    assert _scheduler(load_sweep(TINY).spec, configs[0]) is None


# --- a smaller cardinality is the prefix of the larger one's plan --------------------------------------------

def test_a_prefix_dataset_reuses_the_larger_plans_shards(tiny_config):
    from synthset.data.shards import iter_shard, read_manifest, write_manifest, write_shard
    from synthset.methods import plan_requests
    from synthset.methods.plan import shard_ranges
    from synthset.stages.synthesize import synthesis_dir
    from synthset.sweep.shared import at_cardinality, generation_groups, write_prefix_dataset
    import numpy as np

    names = [f"c{i}" for i in range(10)]
    big = at_cardinality(tiny_config, 12)  # 120 images in shards of 25
    small = at_cardinality(tiny_config, 6)  # 60: shards 0 and 1 whole, shard 2 cut at 60
    group = generation_groups([small, big, at_cardinality(tiny_config, 12)])
    assert len(group) == 1 and next(iter(group.values()))["prefixes"] == [6]
    source = synthesis_dir(big).path("data")
    from synthset.methods import PlanContext

    context = PlanContext(names)
    stats = []
    for i, a, b in shard_ranges(120, 25):
        rows = plan_requests("class_prompt", a, b, 0, context)
        samples = [{"key": r["key"], "image": np.full((4, 4), r["index"], np.uint8), "cls": r["class_id"], "meta": r}
                   for r in rows]
        stats.append(write_shard(source, i, samples))
    write_manifest(source, {"class_names": names, "method": "class_prompt", "plan": {"total": 120, "shard_size": 25}},
                   stats)
    summary = write_prefix_dataset(small, source, names)
    data = Path(summary["dataset"])
    assert summary["generated_now"] == 0 and summary["prefix_of"] == source
    manifest = read_manifest(str(data))
    assert manifest["num_samples"] == 60 and [s["count"] for s in manifest["shards"]] == [25, 25, 10]
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        assert (data / shard).read_bytes() == (Path(source) / shard).read_bytes()
    last = list(iter_shard(str(data / "shard-000002.tar")))
    assert [s["key"] for s in last] == [f"{i:010d}" for i in range(50, 60)]
    assert [int(s["image"][0, 0]) for s in last] == list(range(50, 60))
    # The smaller config's own plan: the same keys, seeds and prompts.
    assert [s["meta"] for s in last] == plan_requests("class_prompt", 50, 60, 0, context)
    assert synthesis_dir(small).is_complete() and write_prefix_dataset(small, source, names)["reused"]

    # Labels: the prefix of the larger dataset's labels, agreement counted again on the cut shard.
    from synthset.stages.synthesize import label_dir
    from synthset.sweep.shared import write_label_prefix

    labelled = label_dir(big).path("data")
    stats = []
    for i, a, b in shard_ranges(120, 25):
        samples = [{"key": f"{j:010d}", "image": np.zeros((4, 4), np.uint8), "cls": j % 10, "meta": {},
                    "soft": np.eye(10, dtype=np.float32)[j % 10 if j % 2 == 0 else (j + 1) % 10]} for j in range(a, b)]
        agrees = {}
        for s in samples:
            agrees[str(s["cls"])] = agrees.get(str(s["cls"]), 0) + int(s["soft"].argmax() == s["cls"])
        stats.append(write_shard(labelled, i, samples, extra_stats={"teacher_agrees": agrees}))
    write_manifest(labelled, {"class_names": names, "method": "class_prompt", "generator": "g", "teacher": "t"}, stats)
    label = write_label_prefix(small, labelled, summary["dataset"])
    assert label["num_samples"] == 60 and label["teacher_agreement"] == pytest.approx(0.5)
    assert read_manifest(label["dataset"])["source"] == summary["dataset"]
    assert [s["key"] for s in iter_shard(label["dataset"] + "/shard-000002.tar")][-1] == "0000000059"


# --- the table: means and standard errors over seeds ---------------------------------------------------------

def test_the_table_aggregates_over_seeds_with_standard_errors(tmp_path):
    from synthset.sweep.report import aggregate, markdown_table, trial_rows, write_plots, write_tables

    spec = load_sweep(TINY).spec
    results = [{"config": {"cardinality": c, "seed": s}, "status": "done", "trial_id": f"{c}{s}",
                "metrics": {"student_soft_accuracy": acc, "images": 60 * c}}
               for c, s, acc in [(1, 0, 0.5), (1, 1, 0.7), (2, 0, 0.6), (2, 1, 0.6)]]
    rows = trial_rows(spec, results)
    summary = {r["cardinality"]: r for r in aggregate(spec, rows)}
    assert summary[1]["student_soft_accuracy_mean"] == pytest.approx(0.6)
    assert summary[1]["student_soft_accuracy_se"] == pytest.approx(0.1)  # std 0.1414 / sqrt(2)
    assert summary[2]["student_soft_accuracy_se"] == pytest.approx(0.0) and summary[2]["seeds"] == 2
    assert "0.6000 ± 0.1000" in markdown_table(spec, list(summary.values()), rows)
    files = write_tables(spec, rows, str(tmp_path))
    plots = write_plots(spec, rows, str(tmp_path))
    assert len(Path(files["trials_csv"]).read_text().splitlines()) == 5
    assert [Path(p).name for p in plots] == ["accuracy_vs_cardinality.png"]
    assert Path(plots[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- a trial Tune restarts after it finished ---------------------------------------------------------------

def test_a_trial_restarted_after_it_finished_reports_its_saved_result_without_training(tmp_path, monkeypatch):
    """Tune saves its experiment state every few seconds: a driver killed just after a trial returned
    restores that trial as unfinished. Its result file makes the restart a report, not a rerun."""
    import ray.tune

    from synthset.sweep import trial as trial_mod

    reported: list[dict] = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.setattr(ray.tune, "report", lambda metrics: reported.append(metrics))
    config = {"cardinality": 1, "seed": 0}
    result = {"student_soft_accuracy": 0.61, "trial_started_at": 1.0}
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "t1.json").write_text(json.dumps({"config": config, "result": result}))
    context = {"sweep_dir": str(tmp_path), "output_root": str(tmp_path), "base_images_per_class": 1}
    trial_mod.run_trial(config, sweep={}, context=context)  # an empty sweep dict would fail if it got that far
    assert reported == [result]
    assert [json.loads(l)["event"] for l in (tmp_path / "trials.jsonl").read_text().splitlines()] == ["reused"]

    # A result saved under another grid point (a reused trial id) is not taken for this one.
    with pytest.raises(Exception):
        trial_mod.run_trial({"cardinality": 2, "seed": 0}, sweep={}, context=context)
    assert reported == [result]


# --- the real driver: shared generation, Tune trials, kill, Tuner.restore -----------------------------------

def _events(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_tiny_sweep_shares_generation_and_resumes_after_the_driver_is_killed(tmp_path, tiny_pipeline_dir):
    root = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(TINY), "--set", f"output.root={root}",
           "--set", f"foundation.path={tiny_pipeline_dir}"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_DEDUP_LOGS": "0"}
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    killed_after: set[str] = set()
    try:
        deadline = time.time() + 900  # generous: a shared 2-core machine can be 10x slower
        while time.time() < deadline and proc.poll() is None:
            dirs = list((root / "sweeps").glob("tiny-*")) if (root / "sweeps").exists() else []
            finished = {e["trial_id"] for e in _events(dirs[0]) if e["event"] == "finish"} if dirs else set()
            if finished:
                time.sleep(2.5)  # > TUNE_GLOBAL_CHECKPOINT_S: the experiment state has recorded it
                killed_after = {e["trial_id"] for e in _events(dirs[0]) if e["event"] == "finish"}
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
                break
            time.sleep(0.3)
    finally:
        if proc.poll() is None and not killed_after:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    first = (tmp_path / "first.log").read_text()
    assert killed_after, "no trial finished before the deadline:\n" + first[-4000:]
    assert len(killed_after) < 4, "every trial finished before the kill: nothing left to resume"

    # The second driver reads the sweep from another checkout, as a resubmitted Ray job does (its working
    # directory is unpacked anew): same sweep, same directory, same MLflow parent run.
    conf2 = tmp_path / "resubmitted" / "conf"
    conf2.mkdir(parents=True)
    for name in ("sweep_tiny.yaml", "tiny.yaml"):
        shutil.copy(ROOT / "conf" / name, conf2 / name)
    cmd[cmd.index(str(TINY))] = str(conf2 / "sweep_tiny.yaml")
    with open(tmp_path / "second.log", "w") as log2:
        second = subprocess.run(cmd, stdout=log2, stderr=subprocess.STDOUT, env=env, timeout=900)
    out = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, out[-6000:]
    assert "resuming" in out

    sweep_dir = next((root / "sweeps").glob("tiny-*"))
    events = _events(sweep_dir)
    starts = [e["trial_id"] for e in events if e["event"] == "start"]
    finishes = {e["trial_id"] for e in events if e["event"] == "finish"}
    assert len(finishes) == 4, events
    for trial_id in killed_after:  # finished before the kill: not run again (at most reported again, if Tune's
        assert starts.count(trial_id) == 1, (trial_id, events)  # state was saved before it finished)
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["trials"] == 4 and summary["done"] == 4 and summary["errors"] == 0
    # This invocation ran the trials the kill left; overhead = its wall ÷ the stage seconds it ran (below 1
    # when concurrent trials overlap).
    assert summary["trials_run_now"] == 4 - len(killed_after) and summary["trial_stage_seconds"] > 0
    assert summary["overhead"] == pytest.approx(summary["wall_seconds"] / summary["trial_stage_seconds"])

    # Generation ran once: 120 images per class... of tiny's 12 per class; the 1x dataset is its prefix.
    assert (first + out).count("images generated in") == 1
    synth = {json.loads((d / "_SUCCESS.json").read_text())["num_samples"]: d for d in (root / "synthesis").iterdir()}
    assert sorted(synth) == [60, 120]
    small = json.loads((synth[60] / "_SUCCESS.json").read_text())
    assert small["generated_now"] == 0 and small["prefix_of"] == str(synth[120] / "data")
    assert (synth[60] / "data" / "shard-000000.tar").read_bytes() == (synth[120] / "data" / "shard-000000.tar").read_bytes()
    labels = {json.loads((d / "_SUCCESS.json").read_text())["num_samples"]: d for d in (root / "label").iterdir()}
    assert sorted(labels) == [60, 120] and "labelled images as the prefix" in first  # the Teacher labelled once
    assert len(list((root / "student-soft").iterdir())) == 4  # 2 cardinalities × 2 seeds

    # Table and plot.
    lines = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and "student_soft_accuracy_se" in lines[0]
    assert "±" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "accuracy_vs_cardinality.png").stat().st_size > 1000

    # MLflow: one parent run per sweep, one child per trial (a restarted trial continues its own).
    db = sqlite3.connect(root / "mlflow.db")
    parent = json.loads((sweep_dir / "parent_run.json").read_text())["run_id"]
    children = db.execute("select run_uuid from tags where key='mlflow.parentRunId' and value=?", (parent,)).fetchall()
    trial_runs = db.execute("select count(distinct value) from tags where key='synthset.trial_id'").fetchone()[0]
    assert trial_runs == 4 and len(children) >= 4
    assert db.execute("select count(*) from metrics where key='student_soft_accuracy'").fetchone()[0] >= 4
