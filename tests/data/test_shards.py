import hashlib
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT, require_import
from synthset.data.shards import (ShardDataset, build_shard, completed_shards, decode_image, iter_shard,
                                  read_manifest, shard_paths, write_manifest, write_shard)


def make_samples(start, stop, soft=False):
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, stop):
        s = {"key": f"{i:010d}", "image": rng.integers(0, 256, (8, 8)).astype(np.uint8), "cls": i % 3,
             "meta": {"index": i, "prompt": "a photo of a bag"}}
        if soft:
            s["soft"] = np.full(3, 1 / 3, np.float32)
        out.append(s)
    return out


def write_dataset(root, n=25, shard_size=10, soft=False):
    stats = [write_shard(str(root), k, make_samples(a, min(a + shard_size, n), soft))
             for k, a in enumerate(range(0, n, shard_size))]
    return write_manifest(str(root), {"class_names": ["a", "b", "c"], "method": "test"}, stats)


def test_shard_members_follow_the_contract(tmp_path):
    write_dataset(tmp_path, n=10, soft=True)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["0000000000.png", "0000000000.cls", "0000000000.json", "0000000000.soft.npy"]
    assert len(names) == 40


def test_round_trip_and_manifest(tmp_path):
    manifest = write_dataset(tmp_path, n=25, shard_size=10)
    assert manifest["num_samples"] == 25 and len(manifest["shards"]) == 3
    assert manifest["totals_per_class"] == {"0": 9, "1": 8, "2": 8}
    for entry in manifest["shards"]:
        assert hashlib.sha256((tmp_path / entry["shard"]).read_bytes()).hexdigest() == entry["sha256"]
    index = json.loads((tmp_path / "index.wids.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(e["url"], e["nsamples"]) for e in index["shardlist"]] == [
        ("shard-000000.tar", 10), ("shard-000001.tar", 10), ("shard-000002.tar", 5)]
    back = [s for p in shard_paths(str(tmp_path)) for s in iter_shard(p)]
    expected = make_samples(0, 10) + make_samples(10, 20) + make_samples(20, 25)
    assert [s["key"] for s in back] == [s["key"] for s in expected]
    for got, want in zip(back, expected):
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["cls"] == want["cls"] and got["meta"] == want["meta"]


def test_same_samples_give_identical_bytes():
    assert build_shard(make_samples(0, 5)) == build_shard(make_samples(0, 5))
    assert build_shard(make_samples(0, 5)) != build_shard(make_samples(1, 6))


def test_no_temporary_files_left_and_resume_record(tmp_path):
    write_shard(str(tmp_path), 0, make_samples(0, 10))
    write_shard(str(tmp_path), 2, make_samples(20, 30))
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert sorted(completed_shards(str(tmp_path))) == [0, 2]
    (tmp_path / "shard-000002.tar").unlink()  # a shard whose tar is gone is not complete
    assert sorted(completed_shards(str(tmp_path))) == [0]


def test_missing_manifest_and_bad_keys(tmp_path):
    write_shard(str(tmp_path), 0, make_samples(0, 3))
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="must not contain"):
        build_shard([{"key": "a.b", "image": np.zeros((2, 2), np.uint8), "cls": 0, "meta": {}}])


def test_corrupt_image_is_named():
    with pytest.raises(ValueError, match="x.png: corrupt image"):
        decode_image(b"not a png", "x.png")


def test_iterable_dataset_splits_across_workers_and_ranks(tmp_path):
    write_dataset(tmp_path, n=50, shard_size=5, soft=True)
    seen = []
    for rank in range(2):
        ds = ShardDataset(str(tmp_path), shuffle=True, seed=1, buffer=7, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        for images, cls, soft in loader:
            assert images.shape[1:] == (1, 8, 8) and soft.shape[1] == 3
            seen += cls.tolist()
    assert len(seen) == 50  # every sample exactly once across 2 ranks × 2 workers
    assert sorted(seen) == sorted(i % 3 for i in range(50))


def test_shuffle_changes_order_but_not_content(tmp_path):
    write_dataset(tmp_path, n=40, shard_size=10)
    plain = [int(x[1]) for x in ShardDataset(str(tmp_path))]
    ds = ShardDataset(str(tmp_path), shuffle=True, seed=0, buffer=8)
    shuffled = [int(x[1]) for x in ds]
    assert sorted(plain) == sorted(shuffled) and plain != shuffled


def test_ray_read_webdataset(tmp_path):
    ray = require_import("ray")
    from synthset.data.shards import read_ray_dataset

    write_dataset(tmp_path, n=12, shard_size=5)
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        rows = read_ray_dataset(str(tmp_path)).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 12
    assert sorted(r["__key__"] for r in rows) == [f"{i:010d}" for i in range(12)]


class _EchoShard:
    """A stand-in shard worker: returns a stats row per shard without a model; shard 99 holds a bad file."""

    def __call__(self, task):
        if task["shard"] == 99:
            raise ValueError("/data/cat/broken.png: cannot read image (truncated)")
        return {"count": 1, "shard": int(task["shard"])}


def test_shard_pool_uses_no_deprecated_ray_arguments():
    """The synthesis/label actor pool passes nothing Ray deprecates (``ray_remote_args`` goes in Ray 2.64)."""
    import warnings

    ray = require_import("ray")
    from synthset.stages.shard_pool import PoolResources, run_shard_pool

    here = os.path.dirname(os.path.abspath(__file__))  # the workers import _EchoShard from this file
    path = os.pathsep.join([here, str(ROOT / "tests"), str(ROOT / "platform")])  # this file imports conftest
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = run_shard_pool([{"shard": i, "start": 0, "stop": 1} for i in range(3)], _EchoShard, {},
                                   PoolResources(min=1, max=1, num_cpus=1), "echo", 3, 0)
        # A worker's own error reaches the driver as itself, naming the file, not as Ray's wrapper.
        with pytest.raises(ValueError, match=r"^/data/cat/broken\.png: cannot read image"):
            run_shard_pool([{"shard": 99}], _EchoShard, {}, PoolResources(min=1, max=1, num_cpus=1), "echo", 1)
    finally:
        ray.shutdown()
    assert sorted(s["shard"] for s in stats) == [0, 1, 2]
    ours = [str(w.message) for w in caught if "ray_remote_args" in str(w.message)]
    assert not ours, ours
