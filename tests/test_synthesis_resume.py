"""The synthesis job: same config → same bytes; a killed job resumes without duplicates or loss."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, have_fashion_mnist

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_fashion_mnist(), reason="dataset-fashion-mnist not installed")]


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


def test_same_config_same_bytes_whatever_the_number_of_actors(tmp_path, tiny_pipeline_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(generate_cmd(a, tiny_pipeline_dir), check=True, capture_output=True, timeout=300)
    subprocess.run(generate_cmd(b, tiny_pipeline_dir, "--set", "synthesis.actors.max=2"),
                   check=True, capture_output=True, timeout=300)
    check_complete(a)
    check_complete(b)
    assert digests(a) == digests(b)
    # The actor count is an execution setting: both runs write the same stage directory.
    assert dataset_dir(a).relative_to(a) == dataset_dir(b).relative_to(b)


def test_sigkill_then_rerun_completes_with_identical_bytes(tmp_path, tiny_pipeline_dir):
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(generate_cmd(reference, tiny_pipeline_dir), check=True, capture_output=True, timeout=300)
    # Twenty shards of ten images: the job is still running when the first shard lands.
    cmd = generate_cmd(killed, tiny_pipeline_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(killed.glob("synthesis/*/data/_shards/*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    data = dataset_dir(killed)
    assert list(data.glob("_shards/*.json")), "no shard finished before the kill"
    assert not (data / "manifest.json").exists(), "the job finished before it was killed; nothing was tested"
    done_before = len(list(data.glob("_shards/*.json")))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    # Actors of the killed job may finish the shard they were writing before Ray reaps them;
    # either way the rerun skips what is complete and generates only the rest.
    resumed = int(re.search(r"(\d+) already complete", out.stdout).group(1))
    assert done_before <= resumed < SHARDS
    assert f'"generated_now": {(SHARDS - resumed) * 10}' in out.stdout
    check_complete(killed)
    assert digests(killed) == digests(reference)
