"""data/webdataset_source.py: local shards with .cls or .json labels, written by webdataset and by tarfile."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from synthset.config import load_config
from synthset.data.sources import open_source
from synthset.data.splits import load_source
from synthset.data.webdataset_source import WebDatasetSource, expand_shards


def png(value, size=(10, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


def write_cls_shards(directory, n_shards=3, per_shard=4):
    """shard-00000{0,1,2}.tar written with webdataset.TarWriter: label i % 3 in .cls, grey level 10 * label."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(directory / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                label = (s * per_shard + i) % 3
                sink.write({"__key__": f"s{s}_{i:03d}", "png": png((10 * label,) * 3, (8 + i, 12)), "cls": label})
    return directory


class Trap:
    """Unpickling this touches a marker file: the test checks that no shard member is ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_cls_shards_from_a_directory_and_from_patterns(tmp_path):
    shards = write_cls_shards(tmp_path / "train")
    source = open_source(load_config(None, ["data.source=webdataset", f"data.path={shards}", "data.channels=3"]).data)
    assert source.class_names == ["0", "1", "2"] and source.parts == ("train",)
    images = source.load("train", 8)
    assert images.images.shape == (12, 8, 8, 3) and images.labels.tolist() == [i % 3 for i in range(12)]
    assert images.keys[:2].tolist() == ["shard-000000.tar/s0_000", "shard-000000.tar/s0_001"]
    assert (images.images[images.labels == 2] == 20).all()
    for pattern in (f"{shards}/shard-{{000000..000002}}.tar", f"{shards}/shard-*.tar",
                    f"{shards}/shard-{{000000,000001,000002}}.tar"):
        assert [p.name for p in expand_shards(pattern)] == [f"shard-{i:06d}.tar" for i in range(3)]
    two = WebDatasetSource(f"{shards}/shard-{{000000..000001}}.tar", class_names=["a", "b", "c"]).load("train", 8)
    assert len(two) == 8 and two.class_names == ["a", "b", "c"] and two.images.shape == (8, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"data.path: no shard files match .*nothing-\*\.tar"):
        WebDatasetSource(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="data.test_path"):
        WebDatasetSource(str(shards), str(tmp_path / "none.tar"))


def test_json_labels_with_a_configured_key_and_no_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    shard = tmp_path / "mixed.tar"
    names = ["cat", "dog", "cat", "emu"]
    with tarfile.open(shard, "w") as tar:                   # plain tarfile, members in WebDataset order
        for i, name in enumerate(names):
            add_member(tar, f"part/{i:04d}.jpg" if i % 2 else f"part/{i:04d}.png",
                       png((200, 0, 0), (16, 16), "RGBA") if i == 3 else png((i * 40,) * 3))
            add_member(tar, f"part/{i:04d}.json", json.dumps({"species": name, "id": i}).encode())
            add_member(tar, f"part/{i:04d}.pyd", pickle.dumps(Trap(marker)))
    source = WebDatasetSource(str(shard), label_key="species", channels=1)
    assert source.class_names == ["cat", "dog", "emu"]        # sorted distinct strings
    images = source.load("train", 12)
    assert images.labels.tolist() == [0, 1, 0, 2] and images.keys[0] == "mixed.tar/part/0000"
    assert images.images.shape == (4, 12, 12) and not marker.exists()
    with pytest.raises(ValueError, match=r"mixed.tar:part/0000: no .cls member \(set data.label_key"):
        WebDatasetSource(str(shard), class_names=["cat", "dog", "emu"]).load("train")
    with pytest.raises(ValueError, match=r"part/0000: .json has no field 'kind' \(data.label_key\)"):
        WebDatasetSource(str(shard), label_key="kind", class_names=["cat", "dog"]).load("train")
    ints = WebDatasetSource(str(shard), label_key="id").load("train", 12)
    assert ints.class_names == ["0", "1", "2", "3"] and ints.labels.tolist() == [0, 1, 2, 3]
    assert not marker.exists()


def test_bad_images_in_shards_are_named_or_skipped(tmp_path):
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for i, payload in enumerate([png(50), png(60)[:40], png(70), None]):
            if payload is not None:
                add_member(tar, f"{i:03d}.png", payload)
            add_member(tar, f"{i:03d}.cls", str(i % 2).encode())
    # Samples are listed before any image is decoded, so the sample without an image fails first;
    # without it, the first image that cannot be decoded is named.
    with pytest.raises(ValueError, match=r"bad.tar:003: sample has no image member"):
        WebDatasetSource(str(shard)).load("train")
    decodable_labels = tmp_path / "decode" / "bad.tar"
    decodable_labels.parent.mkdir()
    with tarfile.open(decodable_labels, "w") as tar:
        for i, payload in enumerate([png(50), png(60)[:40], png(70)]):
            add_member(tar, f"{i:03d}.png", payload)
            add_member(tar, f"{i:03d}.cls", str(i % 2).encode())
    with pytest.raises(ValueError, match=r"bad.tar:001.png: cannot read image"):
        WebDatasetSource(str(decodable_labels)).load("train")
    source = WebDatasetSource(str(shard), on_bad_image="skip")
    images = source.load("train")
    assert images.keys.tolist() == ["bad.tar/000", "bad.tar/002"] and images.labels.tolist() == [0, 0]
    assert [(Path(s.name).name, s.reason.split(" (")[0]) for s in images.skipped] == [
        ("bad.tar:001.png", "cannot read image"), ("bad.tar:003", "sample has no image member")]
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 30)
    with pytest.raises(ValueError, match="junk.tar: unreadable tar file"):
        WebDatasetSource(str(tmp_path / "junk.tar"), class_names=["a", "b"]).load("train")


def test_manifest_class_names_and_test_shards_through_load_source(tmp_path):
    shards = write_cls_shards(tmp_path / "train")
    (shards / "manifest.json").write_text(json.dumps({"class_names": ["red", "green", "blue"]}))
    test = write_cls_shards(tmp_path / "test", n_shards=1, per_shard=3)
    cfg = load_config(None, ["data.source=webdataset", f"data.path={shards}", f"data.test_path={test}",
                             "data.image_size=16", "foundation.arch.image_size=16"]).data
    train, test_set = load_source(cfg)
    assert train.class_names == ["red", "green", "blue"] and len(train) == 12 and len(test_set) == 3
    assert train.images.shape == (12, 16, 16) and test_set.keys[0] == "shard-000000.tar/s0_000"
