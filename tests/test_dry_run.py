"""Every config in conf/ (recursively) dry-runs through the real jobs/pipeline.py and prints its plan.

The dry runs execute ``jobs/pipeline.py`` in this process (``runpy``, as ``python jobs/pipeline.py``
would) so that torch is imported once, not once per config; tests/test_config.py runs one dry run
as a subprocess. Output roots are redirected under ``tmp_path`` (a remote root would be probed over
the network); ``test_an_unreachable_object_store_leaves_completion_unknown`` covers remote roots.
"""

import json
import re
import runpy
import sys

import pytest

from conftest import ROOT

from synthset.sweep.spec import is_sweep_file  # noqa: E402

ALL_YAML = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
# Sweep files (a top-level ``sweep:`` section) dry-run through jobs/sweep.py; the rest are pipeline configs.
SWEEPS = [c for c in ALL_YAML if is_sweep_file(ROOT / "conf" / c)]
CONFIGS = [c for c in ALL_YAML if c not in SWEEPS]


def dry_run(monkeypatch, capsys, *args) -> tuple[str, str]:
    """``python jobs/pipeline.py <args> --dry-run`` in-process; (stdout, stderr)."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / "pipeline.py"), *args, "--dry-run"])
    try:
        runpy.run_path(str(ROOT / "jobs" / "pipeline.py"), run_name="__main__")
    except SystemExit as exit_:
        out, err = capsys.readouterr()
        pytest.fail(f"dry run exited with {exit_.code}: {err[-2000:]}")
    return capsys.readouterr()


def plan_lines(out: str) -> dict[str, str]:
    plan = out.split("=== plan (dry run: nothing was run) ===", 1)
    assert len(plan) == 2, "no plan in the dry run's output"
    return dict(re.match(r"(\w+):\s+(.*)", line).groups() for line in plan[1].strip().splitlines())


def test_the_conf_tree_holds_the_production_configs():
    assert {"prod/loft.yaml", "prod/datadream.yaml", "prod/tckr.yaml", "prod/class_prompt.yaml"} <= set(CONFIGS)
    assert not [c for c in CONFIGS if c.startswith("production_sd21")], "moved to conf/prod/"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_dry_runs_and_prints_its_plan(config, tmp_path, monkeypatch, capsys):
    root = tmp_path / "out"
    out, err = dry_run(monkeypatch, capsys, "--config", str(ROOT / "conf" / config), "--set", f"output.root={root}")
    described = json.loads(out[out.index("\n{\n") + 1:out.index("\n}\n") + 2])
    assert described["stages"] and all(s["dir"].startswith(str(root)) for s in described["stages"].values())
    plan = plan_lines(out)
    assert {"method", "classes", "images", "shards", "assumption"} <= set(plan)
    if config in ("prod/casd.yaml", "prod/rcdm.yaml"):  # their own pixel models: no measured GPU throughput yet
        assert plan["assumption"].startswith("no projection: the method's own diffusion model"), plan["assumption"]
    elif config.startswith("prod/"):
        assert "GPU-hours" in plan["synthesis"] and "per 1M images" in plan["synthesis"]
        assert "assumed, not measured" in plan["assumption"]
    elif config == "own_data.yaml":  # a user's folder, not in this checkout: classes unknown, and said why
        assert plan["classes"] == "unknown (data.path 'data/my_images' is not readable here)", plan["classes"]
    else:  # the embedded default: Fashion-MNIST's 10 classes, measured CPU throughput
        assert re.fullmatch(r"[\d,]+ \([\d,]+ per class\)", plan["images"]), plan["images"]
        assert plan["shards"].split()[0] != "unknown"
    assert not root.exists(), "a dry run wrote to the output root"


@pytest.mark.parametrize("method,loras,gpu_hours", [("loft", "1,600", "246.2"), ("datadream", "100", "246.2"),
                                                     ("tckr", "1", "102.9"), ("class_prompt", "0", "126.8")])
def test_production_plan_for_a_million_images(method, loras, gpu_hours, tmp_path, monkeypatch, capsys):
    """With 100 class folders readable, each production config plans 1M images in 1,000 shards."""
    for name in (f"class{i:03d}" for i in range(100)):
        (tmp_path / "train" / name).mkdir(parents=True)
    out, _ = dry_run(monkeypatch, capsys, "--config", str(ROOT / "conf" / "prod" / f"{method}.yaml"),
                     "--set", f"output.root={tmp_path / 'out'}", "--set", f"data.path={tmp_path / 'train'}",
                     "--set", "data.test_path=null")
    plan = plan_lines(out)
    assert plan["classes"].startswith("100 (class folders of")
    assert plan["images"] == "1,000,000 (10,000 per class)" and plan["shards"].startswith("1,000 of 1,000")
    assert f"expected GPU-hours {gpu_hours} " in plan["synthesis"] and "on 8 GPUs" in plan["synthesis"]
    assert plan["adaptation"].startswith(f"{loras} LoRA(s)")


def test_an_unreachable_object_store_leaves_completion_unknown(monkeypatch, capsys):
    from synthset import storage

    calls = []

    def offline(uri):
        calls.append(uri)
        raise OSError("Could not resolve host: synthset-runs.s3.amazonaws.com")

    monkeypatch.setattr(storage, "exists", offline)
    out, err = dry_run(monkeypatch, capsys, "--config", str(ROOT / "conf" / "prod" / "loft.yaml"))
    stages = json.loads(out[out.index("\n{\n") + 1:out.index("\n}\n") + 2])["stages"]
    assert all(s["complete"] is None and s["dir"].startswith("s3://synthset-runs/") for s in stages.values())
    assert len(calls) == 1, "one failed attempt, not one per stage"
    assert "cannot reach s3://synthset-runs/" in err and "=== plan" in out


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_dry_runs_and_prints_its_plan(sweep, tmp_path, monkeypatch, capsys):
    """``python jobs/sweep.py --config conf/sweep*.yaml --dry-run``: every trial validated, the plan printed."""
    root = tmp_path / "out"
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "jobs" / "sweep.py"), "--config", str(ROOT / "conf" / sweep),
                                      "--set", f"output.root={root}", "--dry-run"])
    try:
        runpy.run_path(str(ROOT / "jobs" / "sweep.py"), run_name="__main__")
    except SystemExit as exit_:
        pytest.fail(f"sweep dry run exited with {exit_.code}: {capsys.readouterr().err[-2000:]}")
    out = capsys.readouterr().out
    plan = json.loads(out[:out.index("\n}\n") + 2])
    assert plan["trials"] == len(plan["trial_configs"]) >= 2 and plan["dir"].startswith(str(root))
    assert plan["generation"] and "=== sweep plan (dry run: nothing was run) ===" in out
    assert not root.exists(), "a dry run wrote to the output root"
