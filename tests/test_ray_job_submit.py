"""``ray job submit`` for real: a local Ray head with token auth, jobs/pipeline.py on conf/tiny.yaml.

The head runs on loopback with its own ports and its own temporary directory, and is stopped by
ending *its* processes (the ``ray start --block`` process, its descendants and anything else whose
command line names that directory): ``ray stop`` would stop every Ray instance on the machine.

Token auth: Ray 2.60 turns it on by default for clusters started by ``ray.init()``; ``ray start``
turns it on when a token exists. The test sets ``RAY_AUTH_MODE=token`` and points
``RAY_AUTH_TOKEN_PATH`` at a token file of its own (``~/.ray/auth_token`` is left alone), for the
head and for the Jobs CLI alike, and checks that a client without the token is refused.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("fashion_mnist")]

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# What the job's working directory upload leaves out (it also honours .gitignore).
EXCLUDES = [".git", ".venv", "runs", "mlruns", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (from the kernel's ephemeral range)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def free_port_range(size: int = 200) -> int:
    """The first of ``size`` consecutive ports that are free now, below the kernel's ephemeral range
    (where ``free_port`` draws) and above Ray's default worker range (10002-19999, other clusters')."""
    for _ in range(50):
        start = random.randrange(20000, 30000 - size)
        try:
            for port in range(start, start + size, 10):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise RuntimeError("no free port range for Ray workers")


@dataclass
class Head:
    address: str        # the dashboard / Jobs API, http://127.0.0.1:<port>
    gcs: str            # the GCS, 127.0.0.1:<port>
    env: dict           # the environment of a client that holds the token
    temp_dir: Path
    log: Path


def _head_processes(head: subprocess.Popen, temp_dir: Path) -> list:
    """Every process of this head: ``ray start`` and its descendants, and any process naming ``temp_dir``."""
    import psutil

    found = {}
    try:
        root = psutil.Process(head.pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                found.setdefault(p.pid, p)
        except (psutil.Error, TypeError):
            continue
    return list(found.values())


def stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """End this head and nothing else: SIGTERM to ``ray start --block`` (it stops its own processes),
    then SIGTERM / SIGKILL to whatever of the head is left."""
    import psutil

    procs = _head_processes(head, temp_dir)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    procs = [p for p in {p.pid: p for p in procs + _head_processes(head, temp_dir)}.values() if p.is_running()]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if head.poll() is None:
        head.kill()
    head.wait(timeout=10)


@pytest.fixture
def ray_head(tmp_path):
    # Ray's Unix sockets live under the temp dir and their paths must fit in 107 bytes, so a short
    # directory under /tmp rather than pytest's long tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp"))
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # `python` in entrypoints: this venv
    names = ["--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--node-manager-port",
             "--object-manager-port", "--metrics-export-port"]
    ports = dict(zip(names, free_ports(len(names))))  # none of Ray's defaults: other clusters run here
    workers = free_port_range()
    ports.update({"--min-worker-port": workers, "--max-worker-port": workers + 199})
    dashboard = ports["--dashboard-port"]
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", "2", "--temp-dir", str(temp_dir), "--disable-usage-stats", "--include-dashboard", "true",
           *[str(x) for kv in ports.items() for x in kv]]
    log = tmp_path / "ray_head.log"
    head = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:  # the Jobs API answers (401 without a token) once the dashboard is up
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    pytest.fail(f"the Ray dashboard did not come up in 180 s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield Head(address, f"127.0.0.1:{ports['--port']}", env, temp_dir, log)
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def jobs_cli(head: Head, command: str, *args: str, env: dict | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """``ray job <command> --address <head> <args>`` from the repo root (``--address`` before any ``--``)."""
    return subprocess.run([RAY, "job", command, "--address", head.address, *args], cwd=ROOT, env=env or head.env,
                          capture_output=True, text=True, timeout=timeout)


def test_pipeline_runs_under_ray_job_submit_with_token_auth(ray_head, tmp_path):
    # Token auth is on: a client without the token is turned away.
    anonymous = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    refused = jobs_cli(ray_head, "list", env=anonymous)
    assert refused.returncode != 0 and ("401" in refused.stdout + refused.stderr
                                        or "Authentication" in refused.stdout + refused.stderr), refused

    out, mlflow_db = tmp_path / "out", tmp_path / "mlflow" / "mlflow.db"
    mlflow_db.parent.mkdir()
    job_id = f"synthset-test-{secrets.token_hex(4)}"
    # RAY_ADDRESS for the workers too: Ray Train's placement-group cleaner looks the cluster up by address,
    # and on a machine with several Ray instances it must find this one.
    runtime_env = {"excludes": EXCLUDES, "py_modules": ["platform/synthset"],
                   "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_ADDRESS": ray_head.gcs}}
    submit = jobs_cli(ray_head, "submit", "--submission-id", job_id, "--working-dir", str(ROOT),
                      "--runtime-env-json", json.dumps(runtime_env), "--",
                      "python", "jobs/pipeline.py", "--config", "conf/tiny.yaml",
                      "--set", f"output.root={out}", "--set", f"tracking.uri=sqlite:///{mlflow_db}",
                      timeout=1500)
    logs = submit.stdout + submit.stderr
    status = jobs_cli(ray_head, "status", job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, (
        f"job {job_id}: {status.stdout}{status.stderr}\n--- submit output ---\n{logs[-6000:]}")
    assert submit.returncode == 0 and "=== synthset pipeline summary ===" in logs, logs[-6000:]

    # The uploaded working directory left out the virtualenv, the runs and git (a few MB, not GB).
    uploads = list(ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
    assert uploads and not any((u / sub).exists() for u in uploads for sub in (".venv", "runs", ".git"))

    # Shards and manifest as the contract says.
    summary = json.loads(next(out.glob("summary-*.json")).read_text())
    assert summary["images"] == 60
    data = next((out / "synthesis").glob("*/data"))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 60
    assert sorted(e["shard"] for e in manifest["shards"]) == sorted(p.name for p in data.glob("shard-*.tar"))
    labelled = json.loads(next((out / "label").glob("*/data/manifest.json")).read_text())
    assert labelled["num_samples"] == 60

    # MLflow runs in the tracking store the job was given: the parent run and nested stage runs.
    db = sqlite3.connect(mlflow_db)
    names = {n for (n,) in db.execute("select name from runs")}
    assert any(n.endswith("-pipeline") for n in names) and {"teacher", "student-soft", "evaluate"} <= names
    assert not (out / "mlflow.db").exists()
