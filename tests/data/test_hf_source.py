"""data/hf_source.py: a tiny Hugging Face dataset built with Dataset.from_dict, saved and loaded by path."""

import numpy as np
import pytest
from PIL import Image

from conftest import require_import

datasets = require_import("datasets")

from synthset.config import load_config  # noqa: E402
from synthset.data.hf_source import HFSource  # noqa: E402
from synthset.data.sources import open_source  # noqa: E402
from synthset.data.splits import load_source  # noqa: E402


def pictures(n, offset=0):
    """n RGB images of assorted sizes and modes; image i has grey level 10 * (i + offset)."""
    out = []
    for i in range(n):
        level = 10 * (i + offset)
        mode = ("RGB", "L", "RGBA")[i % 3]
        out.append(Image.new(mode, (12 + i, 20 - i), level if mode == "L" else (level, level, level, 255)[:len(mode)]))
    return out


@pytest.fixture
def saved_dataset(tmp_path):
    """A DatasetDict (train 6, test 3) with an Image column and a ClassLabel, saved with save_to_disk."""
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["ant", "bee"]),
                                  "note": datasets.Value("string")})
    train = datasets.Dataset.from_dict({"img": pictures(6), "kind": [0, 1, 0, 1, 1, 0], "note": ["x"] * 6},
                                       features=features)
    test = datasets.Dataset.from_dict({"img": pictures(3, offset=10), "kind": [1, 0, 1], "note": ["y"] * 3},
                                      features=features)
    path = tmp_path / "bugs"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return path


def test_saved_dataset_by_path_with_its_class_labels(saved_dataset):
    cfg = load_config(None, ["data.source=hf", f"data.path={saved_dataset}", "data.test_split=test",
                             "data.image_column=img", "data.label_column=kind", "data.channels=3"]).data
    source = open_source(cfg)
    assert source.class_names == ["ant", "bee"] and source.parts == ("train", "test")
    train = source.load("train", 16)
    assert train.images.shape == (6, 16, 16, 3) and train.labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert train.keys.tolist() == [f"train/{i}" for i in range(6)]
    assert [int(train.images[i, 8, 8, 0]) for i in range(6)] == [0, 10, 20, 30, 40, 50]
    test = source.load("test", 16)
    assert test.labels.tolist() == [1, 0, 1] and int(test.images[0, 8, 8, 1]) == 100
    grey_train, grey_test = load_source(cfg.model_copy(update={"channels": 1}))
    assert grey_train.images.shape == (6, 32, 32) and len(grey_test) == 3   # fitted to data.image_size


def test_string_labels_single_dataset_and_bad_rows(tmp_path):
    rows = {"image": pictures(4) + [{"bytes": b"garbage, not a PNG", "path": None}],
            "label": ["wasp", "ant", "wasp", "moth", "ant"]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    path = tmp_path / "single"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    with pytest.raises(ValueError, match=r"single\[train\]\[4\]: cannot read image"):
        HFSource(str(path)).load("train", 8)
    source = HFSource(str(path), on_bad_image="skip")
    assert source.class_names == ["ant", "moth", "wasp"]
    images = source.load("train", 8)
    assert images.labels.tolist() == [2, 0, 2, 1] and images.images.shape == (4, 8, 8)
    assert [s.name for s in images.skipped] == [f"{path}[train][4]"]
    with pytest.raises(ValueError, match="data.test_split: .* single dataset without splits"):
        HFSource(str(path), test_split="test")


def test_arrays_in_the_image_column_and_integer_labels(tmp_path):
    rng = np.random.default_rng(0)
    rows = {"pixels": [rng.integers(0, 256, (8, 8)).astype(np.uint8) for _ in range(3)], "y": [2, 0, 2]}
    path = tmp_path / "arrays"
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    source = HFSource(str(path), image_column="pixels", label_column="y")
    images = source.load("train")
    assert source.class_names == ["0", "1", "2"] and images.images.shape == (3, 8, 8)
    np.testing.assert_array_equal(images.images[1], np.asarray(rows["pixels"][1]))


def test_missing_columns_splits_and_paths_name_the_field(saved_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"data.image_column: .* has no column 'image' \(columns: img, kind, note\)"):
        HFSource(str(saved_dataset), label_column="kind")
    with pytest.raises(ValueError, match=r"data.label_column: .* has no column 'label'"):
        HFSource(str(saved_dataset), image_column="img")
    with pytest.raises(ValueError, match=r"data.test_split: .* has no split 'validation' \(it has train, test\)"):
        HFSource(str(saved_dataset), test_split="validation", image_column="img", label_column="kind")
    with pytest.raises(ValueError, match="data.class_names: .* differ from the ClassLabel names"):
        HFSource(str(saved_dataset), image_column="img", label_column="kind", class_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="data.path: .*nowhere is not a directory"):
        HFSource(str(tmp_path / "nowhere"))
