import gzip
import struct

import numpy as np
import pytest

from synthset.data.sources import load_digits_fixture, locate_fashion_mnist, read_idx
from conftest import have_fashion_mnist


def write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, arr, compress)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_idx_is_named(tmp_path):
    arr = np.zeros((5, 4, 4), np.uint8)
    path = tmp_path / "t.idx"
    write_idx(path, arr, compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t.idx.*truncated"):
        read_idx(path)


def test_missing_dataset_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setattr("synthset.data.sources.DEBIAN_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(FileNotFoundError) as err:
        locate_fashion_mnist(str(tmp_path / "nowhere"), download=False, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "nowhere" in msg and "no-debian" in msg and "download" in msg and "dataset-fashion-mnist" in msg


def test_configured_directory_is_used(tmp_path):
    for stem, shape in [("train-images-idx3-ubyte", (3, 28, 28)), ("train-labels-idx1-ubyte", (3,)),
                        ("t10k-images-idx3-ubyte", (2, 28, 28)), ("t10k-labels-idx1-ubyte", (2,))]:
        write_idx(tmp_path / f"{stem}.gz", np.zeros(shape, np.uint8))
    assert locate_fashion_mnist(str(tmp_path), download=False, cache_dir=tmp_path / "c") == tmp_path


def test_digits_fixture():
    train, test = load_digits_fixture()
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8)
    assert len(train) + len(test) == 1797 and len(train.class_names) == 10


@pytest.mark.skipif(not have_fashion_mnist(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    from synthset.data.sources import load_fashion_mnist

    train, test = load_fashion_mnist(download=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
