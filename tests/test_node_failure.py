"""A node dies mid-run (a spot GPU taken back on KubeRay): the stages finish, and the outputs do not change.

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs, so that all work goes to
worker nodes). Each test starts the stage on one worker node, and once the stage has written part of its
output, adds a second node and removes the first — its raylet and every worker on it are killed:

* synthesis and labelling (the shard pool): the lost actor's shard goes back to the queue, the actor is
  restarted on the new node, and every shard is byte-identical to a run without Ray;
* a Ray Train stage (the RCDM generator): Ray Train starts the worker group again on the new node from the
  last checkpoint (``FailureConfig``) and finishes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from synthset.config import load_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
ENV = {"env_vars": {"PYTHONPATH": str(ROOT / "platform"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.first = c.add_node(num_cpus=1)
    ray.init(address=c.address, runtime_env=ENV, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _run_and_replace_node(cluster, run, ready):
    """``run()`` on a thread; once ``ready()``, a second node joins and the first is removed (its raylet and
    workers killed) — from this, the main thread, where Ray starts and stops nodes. Returns ``run()``'s result."""
    out = {}

    def target():
        try:
            out["result"] = run()
        except BaseException as err:  # re-raised below
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 600
    while not ready() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    replaced = thread.is_alive()  # the stage was still running when its node went
    if replaced:
        new = cluster.add_node(num_cpus=1)
        cluster.remove_node(cluster.first)
        cluster.first = new
    thread.join()
    if "error" in out:
        raise out["error"]
    assert replaced, "the stage finished before its node could be removed"
    return out["result"]


def _shard_bytes(dataset) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dataset.glob("shard-*.tar"))}


def test_synthesis_and_labelling_finish_byte_identical_when_a_node_dies(cluster, tmp_path, tiny_pipeline_dir):
    from synthset.models.classifiers import build_classifier, save_classifier
    from synthset.stages.synthesize import run_label, run_synthesis

    names = [f"class{c}" for c in range(10)]
    overrides = [f"foundation.path={tiny_pipeline_dir}", "synthesis.images_per_class=16", "synthesis.shard_size=20",
                 "synthesis.actors.num_cpus=1", "label.actors.num_cpus=1", "tracking.enabled=false"]
    cfg = load_config(ROOT / "conf" / "tiny.yaml", [*overrides, f"output.root={tmp_path / 'cluster'}"])
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg.teacher, 10, in_channels=1), str(teacher), cfg.teacher, 10, 1, {})

    from synthset.stages.synthesize import label_dir, synthesis_dir

    data = Path(synthesis_dir(cfg).path("data"))
    synthesis = _run_and_replace_node(cluster, lambda: run_synthesis(cfg, str(tiny_pipeline_dir), names),
                                      lambda: len(list((data / "_shards").glob("*.json"))) >= 1)
    assert synthesis["num_samples"] == 160
    labelled = Path(label_dir(cfg).path("data"))
    label = _run_and_replace_node(cluster, lambda: run_label(cfg, synthesis["dataset"], str(teacher)),
                                  lambda: len(list((labelled / "_shards").glob("*.json"))) >= 1)
    assert label["num_samples"] == 160

    ray.shutdown()  # the same stages without Ray (in this process): the reference bytes
    reference = load_config(ROOT / "conf" / "tiny.yaml", [*overrides, f"output.root={tmp_path / 'alone'}"])
    alone = run_synthesis(reference, str(tiny_pipeline_dir), names)
    alone_label = run_label(reference, alone["dataset"], str(teacher))
    for ours, theirs in ((synthesis, alone), (label, alone_label)):
        got, want = _shard_bytes(Path(ours["dataset"])), _shard_bytes(Path(theirs["dataset"]))
        assert len(got) == 8 and got == want


def test_a_ray_train_stage_resumes_from_its_checkpoint_on_another_node(cluster, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from synthset.stages import prepare
    from synthset.stages.rcdm import generator_dir, run_rcdm_generator

    cfg = load_config(ROOT / "conf" / "tiny.yaml", [
        f"output.root={tmp_path / 'run'}", "synthesis.method=rcdm", "tracking.enabled=false",
        "synthesis.rcdm.model.channels=[8,16]", "synthesis.rcdm.model.num_train_timesteps=100",
        "synthesis.rcdm.train.steps=30", "synthesis.rcdm.train.batch_size=8",
        "synthesis.rcdm.train.checkpoint_every=3", "synthesis.rcdm.train.cpus_per_worker=1"])
    g = torch.Generator().manual_seed(0)
    labels = np.arange(12) % 3
    embeddings = torch.randn(12, 6, generator=g).numpy()
    images = torch.randint(0, 256, (12, 32, 32), dtype=torch.uint8, generator=g).numpy()
    private = types.SimpleNamespace(read=lambda rows, size: images[rows], labels=labels)
    monkeypatch.setattr(prepare, "load_splits", lambda c: types.SimpleNamespace(private=private,
                                                                                 class_names=["a", "b", "c"]))
    path = str(tmp_path / "embeddings.safetensors")
    save_file({"embeddings": embeddings, "labels": labels, "position": np.arange(12)}, path)
    stage_ray = generator_dir(cfg).path("ray")
    checkpointed = lambda: any(f == "state.json" for _, _, files in os.walk(stage_ray) for f in files)
    summary = _run_and_replace_node(cluster, lambda: run_rcdm_generator(cfg, {"embeddings": path,
                                                                              "encoder": "public_cnn"}), checkpointed)
    assert summary["steps"] == 30
    assert summary["resumed_from"] > 0  # the new worker group started from a checkpoint, not from step 0
