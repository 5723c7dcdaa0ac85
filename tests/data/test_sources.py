import gzip
import struct

import numpy as np
import pytest

from synthset.config import DATA_SOURCES, DataConfig, load_config
from synthset.data.sources import SOURCES, load_digits_fixture, locate_fashion_mnist, open_source, read_idx
from synthset.data.splits import load_source


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


@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_mnist_from_the_debian_package():
    from synthset.data.sources import load_fashion_mnist

    train, test = load_fashion_mnist(download=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_every_configurable_source_has_an_opener():
    assert tuple(SOURCES) == DATA_SOURCES


@pytest.mark.parametrize("overrides, message", [
    (["data.source=mnist"], "data.source: Input should be 'fashion_mnist', 'digits', 'image_folder', 'webdataset'"),
    (["data.source=image_folder"], "data.path: required for data.source='image_folder'"),
    (["data.source=hf"], "data.path: required for data.source='hf'"),
    (["data.source=digits", "data.path=/x"], "data.path: not read by data.source='digits'"),
    (["data.source=fashion_mnist", "data.test_path=/x"], "data.test_path: not read by data.source='fashion_mnist'"),
    (["data.source=image_folder", "data.path=/x", "data.root=/y"], "data.root: read only by data.source="),
    (["data.source=hf", "data.path=/x", "data.test_path=/y"], "data.test_path: not read by data.source='hf'"),
    (["data.channels=2"], "data.channels: Input should be 1 or 3"),
    (["data.on_bad_image=ignore"], "data.on_bad_image: Input should be 'error' or 'skip'"),
    (["data.test_fraction=1"], "data.test_fraction"),
    (["data.alpha_background=300"], "data.alpha_background"),
    (["data.source=webdataset", "data.path=/x", "data.class_names=[a, a]"], "data.class_names: repeated names"),
])
def test_source_settings_are_checked_before_any_work(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_an_unknown_source_is_an_error_not_digits():
    # Validation rejects it first; a DataConfig built without validation must not silently read digits.
    cfg = DataConfig.model_construct(**{**DataConfig().model_dump(), "source": "mnist"})
    with pytest.raises(ValueError, match="data.source: unknown source 'mnist'"):
        load_source(cfg)


def test_array_sources_follow_the_protocol():
    gray = open_source(DataConfig(source="digits"))
    assert gray.parts == ("train", "test") and gray.native_size == (8, 8)
    train, test = load_digits_fixture()
    loaded = gray.load("train")
    np.testing.assert_array_equal(loaded.images, train.images)            # channels=1: the arrays as they were
    assert loaded.keys[0] == "train/0000" and loaded.channels == 1
    first = next(gray.samples("test"))
    assert first.key == "test/000" and first.label == test.labels[0]
    np.testing.assert_array_equal(first.image, test.images[0])
    rgb = open_source(DataConfig(source="digits", channels=3))
    fitted = rgb.load("test", 10)
    assert fitted.images.shape == (len(test), 10, 10, 3) and fitted.channels == 3
    np.testing.assert_array_equal(fitted.images[:, 1:9, 1:9, 2], test.images)  # padded, grey in every channel
    np.testing.assert_array_equal(next(rgb.samples("test", 10)).image, fitted.images[0])
    with pytest.raises(ValueError, match="no 'validation' part"):
        gray.load("validation")
