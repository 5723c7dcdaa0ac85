"""The synthesis job: same config → same bytes; a killed job or actor loses and duplicates nothing.

Each test compares against one uninterrupted reference run (module fixture) of the real
``jobs/generate.py`` on the tiny config: 200 images in 20 shards.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("fashion_mnist")]


PER_CLASS = 20            # 10 classes → 200 images
TOTAL, SHARDS = 200, 20   # shard_size 10


def generate_cmd(root, model, *extra):
    return [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(ROOT / "conf" / "tiny.yaml"),
            "--set", f"output.root={root}", "--set", f"foundation.path={model}",
            "--set", f"synthesis.images_per_class={PER_CLASS}", "--set", "synthesis.shard_size=10",
            "--set", "tracking.enabled=false", *extra]


def dataset_dir(root):
    return next((root / "synthesis").glob("*/data"))


def digests(root):
    data = dataset_dir(root)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.glob("shard-*.tar"))}


def check_complete(root, n=TOTAL):
    data = dataset_dir(root)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["num_samples"] == n and len(manifest["shards"]) == n // 10
    keys = []
    for entry in manifest["shards"]:
        assert hashlib.sha256((data / entry["shard"]).read_bytes()).hexdigest() == entry["sha256"]
        import tarfile
        with tarfile.open(data / entry["shard"]) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(keys) == n and len(set(keys)) == n
    assert not [p for p in data.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("reference")
    subprocess.run(generate_cmd(root, tiny_pipeline_dir), check=True, capture_output=True, timeout=300)
    check_complete(root)
    return digests(root)


def wait_for_first_shard(root, proc, timeout=240, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline and not list(root.glob("synthesis/*/data/_shards/*.json")):
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the job exited ({proc.returncode}) before writing a shard:\n{tail}")
        time.sleep(0.1)
    stats = sorted(root.glob("synthesis/*/data/_shards/*.json"))
    assert stats, "no shard finished in time"
    return stats


def test_same_config_same_bytes_whatever_the_number_of_actors(tmp_path, tiny_pipeline_dir, reference):
    two = tmp_path / "two"
    subprocess.run(generate_cmd(two, tiny_pipeline_dir, "--set", "synthesis.actors.max=2"),
                   check=True, capture_output=True, timeout=300)
    check_complete(two)
    assert digests(two) == reference
    # The actor count is an execution setting: both runs write the same stage directory name.
    assert dataset_dir(two).parent.name == json.loads((dataset_dir(two) / "manifest.json").read_text())["config_hash"]


def test_sigkill_then_rerun_completes_with_identical_bytes(tmp_path, tiny_pipeline_dir, reference):
    killed = tmp_path / "killed"
    # Twenty shards of ten images: the job is still running when the first shard lands.
    cmd = generate_cmd(killed, tiny_pipeline_dir)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_first_shard(killed, proc, log=log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    data = dataset_dir(killed)
    assert not (data / "manifest.json").exists(), "the job finished before it was killed; nothing was tested"
    done_before = len(list(data.glob("_shards/*.json")))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    # Actors of the killed job may finish the shard they were writing before Ray reaps them;
    # either way the rerun skips what is complete and generates only the rest.
    resumed = int(re.search(r"(\d+) already complete", out.stdout).group(1))
    assert done_before <= resumed < SHARDS
    assert f'"generated_now": {(SHARDS - resumed) * 10}' in out.stdout
    check_complete(killed)
    assert digests(killed) == reference


def test_actor_killed_mid_shard_is_replaced_and_its_shard_redone(tmp_path, tiny_pipeline_dir, reference):
    root = tmp_path / "actor"
    proc = subprocess.Popen(generate_cmd(root, tiny_pipeline_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = wait_for_first_shard(root, proc)
        # The only actor wrote the first shard and is now inside the next one: kill it.
        victim = json.loads(first[0].read_text())["pid"]
        os.kill(victim, signal.SIGKILL)
        assert not list(root.glob("synthesis/*/data/manifest.json")), "finished before the kill: nothing tested"
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    data = dataset_dir(root)
    pids = {json.loads(p.read_text())["pid"] for p in data.glob("_shards/*.json")}
    # Ray may also redo work the victim had finished (its task outputs die with it); harmless,
    # because shards are deterministic and written atomically, but the replacement must exist.
    assert pids - {victim}, f"no replacement actor wrote a shard: {pids}"
    assert '"generated_now": 200' in out
    check_complete(root)
    assert digests(root) == reference


def test_object_store_output_resumes_and_matches_local_bytes(tmp_path, tiny_pipeline_dir, reference, s3_server):
    cmd = generate_cmd("s3://synthset/runs", tiny_pipeline_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240

    def listing():
        pages = s3_server.get_paginator("list_objects_v2").paginate(Bucket="synthset", Prefix="runs/synthesis/")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    while time.time() < deadline and not [k for k in listing() if k.endswith(".tar.json")]:
        assert proc.poll() is None, "the job exited before writing a shard"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not [k for k in listing() if k.endswith("/manifest.json")], "finished before the kill"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert int(re.search(r"(\d+) already complete", out.stdout).group(1)) >= 1
    keys = listing()
    manifest_key = next(k for k in keys if k.endswith("/data/manifest.json"))
    manifest = json.loads(s3_server.get_object(Bucket="synthset", Key=manifest_key)["Body"].read())
    assert manifest["num_samples"] == TOTAL and len(manifest["shards"]) == SHARDS
    prefix = manifest_key.rsplit("/", 1)[0]
    remote = {}
    for entry in manifest["shards"]:
        body = s3_server.get_object(Bucket="synthset", Key=f"{prefix}/{entry['shard']}")["Body"].read()
        remote[entry["shard"]] = hashlib.sha256(body).hexdigest()
        assert remote[entry["shard"]] == entry["sha256"]
    assert remote == reference
    assert not [k for k in keys if ".tmp-" in k]
