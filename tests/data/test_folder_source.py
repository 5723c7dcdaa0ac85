"""data/folder_source.py: an ImageFolder-style directory with mixed sizes, modes and one corrupt file."""

import time

import numpy as np
import pytest
from PIL import Image

from synthset.config import DataConfig, load_config
from synthset.data.folder_source import ImageFolderSource
from synthset.data.sources import open_source
from synthset.data.splits import load_source, make_splits


def make_odd_folder(root, corrupt=True):
    """bird/cat/dog folders: RGB of mixed sizes, RGBA, CMYK JPEG, grayscale, palette, WebP, stray files."""
    rng = np.random.default_rng(0)
    for name in ("bird", "cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)).save(root / "cat" / "a_rgb.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 1] = 255                          # green hidden under full transparency: must come out white
    Image.fromarray(rgba, "RGBA").save(root / "cat" / "b_rgba.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "cat" / "c_cmyk.jpg")
    Image.new("RGB", (12, 12), (0, 0, 200)).save(root / "cat" / "d.webp")
    Image.new("L", (28, 28), 77).save(root / "dog" / "a_gray.png")
    palette = Image.new("P", (50, 70))
    palette.putpalette([255, 0, 0] + [0] * 765)
    palette.save(root / "dog" / "b_palette.png")
    (root / "dog" / "nested").mkdir()
    Image.new("RGB", (200, 100), (90, 90, 90)).save(root / "dog" / "nested" / "c_big.JPG")
    Image.new("RGB", (16, 16), (250, 250, 0)).save(root / "bird" / "a.png")
    (root / "bird" / "notes.txt").write_text("not an image, ignored")
    (root / "bird" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()                   # not a class
    if corrupt:
        good = (root / "cat" / "a_rgb.png").read_bytes()
        (root / "dog" / "broken.png").write_bytes(good[:len(good) // 2])  # truncated PNG
    return root


def test_corrupt_file_is_named_quickly(tmp_path):
    root = make_odd_folder(tmp_path / "pets")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"dog/broken\.png: cannot read image.*on_bad_image: skip"):
        open_source(DataConfig(source="image_folder", path=str(root), channels=3)).load("train", 16)
    assert time.monotonic() - start < 5


KEYS = ["bird/a.png", "cat/a_rgb.png", "cat/b_rgba.png", "cat/c_cmyk.jpg", "cat/d.webp", "dog/a_gray.png",
        "dog/b_palette.png", "dog/nested/c_big.JPG"]


@pytest.mark.parametrize("channels", [1, 3])
def test_skip_lists_bad_files_and_converts_every_mode(tmp_path, channels):
    root = make_odd_folder(tmp_path / "pets")
    source = open_source(DataConfig(source="image_folder", path=str(root), channels=channels, on_bad_image="skip"))
    assert source.class_names == ["bird", "cat", "dog"] and source.parts == ("train",)
    images = source.load("train", 16)
    shape = (16, 16) if channels == 1 else (16, 16, 3)
    assert images.images.shape == (len(KEYS),) + shape and images.images.dtype == np.uint8
    assert images.channels == channels
    assert images.keys.tolist() == KEYS                                   # sorted; .txt, .DS_Store, .hidden ignored
    assert images.labels.tolist() == [0, 1, 1, 1, 1, 2, 2, 2]
    assert [s.name for s in images.skipped] == [str(root / "dog" / "broken.png")]
    assert source.skipped["train"] == images.skipped and "cannot read image" in images.skipped[0].reason
    by_key = dict(zip(KEYS, images.images.astype(int)))
    assert (by_key["cat/b_rgba.png"] == 255).all()                       # composited on white, not green
    assert (by_key["dog/b_palette.png"] == ([255, 0, 0] if channels == 3 else 76)).all()  # its colour, luma 76
    assert (np.abs(by_key["cat/c_cmyk.jpg"] - ([254, 0, 0] if channels == 3 else 76)) <= 3).all()
    assert (by_key["dog/a_gray.png"] == 77).all()                        # 28 → 16: resized, one grey level
    assert (np.abs(by_key["dog/nested/c_big.JPG"] - 90) <= 2).all()      # 200x100 → shorter side 16, cropped


def test_image_folder_through_the_config_gives_grayscale_splits(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(1)
    for c, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(15):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            Image.new("RGB", size, (40 + 100 * c, 10 * i, 0)).save(root / name / f"{i:02d}.png")
    cfg = load_config(None, ["data.source=image_folder", f"data.path={root}", "data.image_size=16",
                             "foundation.arch.image_size=16", "data.splits.public=5", "data.splits.private=12",
                             "data.test_fraction=0.3", "replication.tile=4"])
    train, test = load_source(cfg.data)
    assert train.images.shape[1:] == (16, 16) and test.images.shape[1:] == (16, 16)
    assert len(train) + len(test) == 30 and len(test) > 0
    assert not set(train.keys) & set(test.keys)
    again_train, _ = load_source(cfg.data)
    np.testing.assert_array_equal(train.keys, again_train.keys)          # the test set is a fixed function of keys
    splits = make_splits(cfg.data)
    assert splits.private.images.shape == (12, 16, 16) and splits.class_names == ["circle", "square"]
    assert splits.test.keys.tolist() == test.keys.tolist()


def test_image_folder_layout_errors_name_the_class_or_field(tmp_path):
    root = make_odd_folder(tmp_path / "pets", corrupt=False)
    with pytest.raises(ValueError, match="different sizes need a size"):
        ImageFolderSource(root).load("train")                            # mixed sizes need data.image_size
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="data.path: class 'empty' has no images"):
        ImageFolderSource(root).load("train", 16)
    with pytest.raises(FileNotFoundError, match="data.path: .*missing is not a directory"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="data.path: .*flat has no class folders"):
        ImageFolderSource(tmp_path / "flat")
    (tmp_path / "test" / "horse").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"data.test_path: class folder\(s\) \['horse'\]"):
        ImageFolderSource(root, tmp_path / "test")


def test_test_path_is_the_test_part(tmp_path):
    root = make_odd_folder(tmp_path / "pets", corrupt=False)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "test" / "dog" / "x.png")
    source = ImageFolderSource(root, tmp_path / "test", channels=3)
    assert source.parts == ("train", "test")
    test = source.load("test", 8)
    assert test.keys.tolist() == ["dog/x.png"] and test.labels.tolist() == [2] and test.images.shape == (1, 8, 8, 3)


def test_load_source_reports_skipped_files(tmp_path, capsys):
    root = make_odd_folder(tmp_path / "pets")
    cfg = DataConfig(source="image_folder", path=str(root), on_bad_image="skip", test_fraction=0.4, image_size=16)
    train, test = load_source(cfg)
    assert len(train) + len(test) == len(KEYS)
    assert [s.name for s in train.skipped] == [str(root / "dog" / "broken.png")]
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
