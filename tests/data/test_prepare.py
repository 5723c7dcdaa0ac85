"""stages/prepare.py and data/prepare.py: the source is read once, its splits written as shards and read back."""

import json

import numpy as np
import pytest

from synthset.config import Config
from synthset.data.splits import make_splits
from synthset.stages import prepare as prepare_stage
from synthset.stages.prepare import load_splits, prepare_dir, run_prepare

def make_rgb_folder(root, per_class: int = 30, seed: int = 0):
    """root/{disc,square,stripes}/: RGB images of mixed sizes and shapes, plus odd files among them —
    an RGBA PNG, a CMYK JPEG, a grayscale PNG, a palette GIF and one truncated (corrupt) PNG."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = {"disc": (220, 40, 40), "square": (40, 200, 60), "stripes": (40, 60, 220)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(24, 56, 2))
            background = tuple(int(v) for v in rng.integers(0, 90, 3))
            image = Image.new("RGB", (w, h), background)
            draw = ImageDraw.Draw(image)
            tint = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in colour)
            m = min(w, h)
            if name == "disc":
                draw.ellipse([w / 2 - m / 3, h / 2 - m / 3, w / 2 + m / 3, h / 2 + m / 3], fill=tint)
            elif name == "square":
                draw.rectangle([w / 2 - m / 4, h / 2 - m / 4, w / 2 + m / 4, h / 2 + m / 4], fill=tint)
            else:
                for x in range(0, w, 6):
                    draw.rectangle([x, 0, x + 2, h], fill=tint)
            image.save(root / name / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[8:22, 8:22] = (230, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "disc" / "odd_rgba.png")
    Image.new("CMYK", (40, 32), (200, 0, 200, 0)).save(root / "square" / "odd_cmyk.jpg")
    Image.new("L", (28, 28), 120).save(root / "stripes" / "odd_gray.png")
    Image.new("RGB", (20, 20), (30, 30, 200)).convert("P").save(root / "stripes" / "odd_palette.gif")
    good = (root / "disc" / "001.png").read_bytes()
    (root / "disc" / "odd_corrupt.png").write_bytes(good[:len(good) // 2])
    return root


def _config(tmp_path, **data):
    return Config.model_validate({"output": {"root": str(tmp_path / "runs")}, "data": data,
                                  "foundation": {"arch": {"image_size": data["image_size"]}}})


@pytest.fixture
def count_reads(monkeypatch):
    """Counts every time a source is opened to be read (``open_source``, wherever it is called from)."""
    import synthset.data.prepare as prepare_module
    import synthset.data.splits as splits_module

    reads = []
    real = splits_module.open_source

    def counting(cfg, *args, **kwargs):
        reads.append(cfg.source)
        return real(cfg, *args, **kwargs)

    for module in (splits_module, prepare_module, prepare_stage):
        monkeypatch.setattr(module, "open_source", counting)
    monkeypatch.setattr(prepare_stage, "_CACHE", {})
    return reads


def _assert_same(a, b):
    for name in ("public", "public_unshifted", "private", "holdout", "test"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert y.read().dtype == np.uint8 and np.array_equal(x.images, y.read()), name
        assert np.array_equal(x.labels, y.labels) and list(x.keys) == list(y.keys), name
    for name in ("public_index", "private_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.record() == b.record()


@pytest.mark.parametrize("shift", ["shrink", "none"])
def test_prepared_splits_equal_the_source_splits_byte_for_byte(tmp_path, shift):
    cfg = _config(tmp_path, source="digits", image_size=16, public_shift=shift,
                  splits={"public": 600, "private": 400, "holdout": 40, "seed": 3})
    _assert_same(make_splits(cfg.data), load_splits(cfg))
    stage = prepare_dir(cfg)
    record = json.loads((tmp_path / "runs" / "prepare" / stage.hash / "splits.json").read_text())
    assert record == make_splits(cfg.data).record()  # splits recorded where the shards are
    manifest = json.loads((tmp_path / "runs" / "prepare" / stage.hash / "private" / "manifest.json").read_text())
    assert manifest["num_samples"] == 360 and manifest["complete"]


def test_the_source_is_read_once_and_never_again(tmp_path, count_reads):
    from synthset.stages.privacy import candidate_pool
    from synthset.stages.report import evaluate_classifiers
    from synthset.pipeline import validate_inputs

    cfg = _config(tmp_path, source="digits", image_size=16, splits={"public": 600, "private": 400, "holdout": 20})
    expected = make_splits(cfg.data)
    count_reads.clear()
    assert validate_inputs(cfg) == expected.class_names  # runs the prepare stage: the one read
    candidate_pool(cfg)
    evaluate_classifiers(cfg)  # nothing trained yet: reads the test split only
    validate_inputs(cfg)
    assert count_reads == ["digits"]
    # A fresh process (a Ray worker, the next job) and a config changing only later stages: shards, not the source.
    prepare_stage._CACHE.clear()
    later = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"epochs": 7})})
    assert prepare_dir(later).uri == prepare_dir(cfg).uri
    _assert_same(expected, load_splits(later))
    assert run_prepare(later)["reused"]
    assert count_reads == ["digits"]


def test_bad_image_fails_naming_the_file_and_writes_nothing(tmp_path):
    cfg = _config(tmp_path, source="image_folder", path=str(make_rgb_folder(tmp_path / "pets", 8)), channels=3,
                  image_size=16, splits={"public": 0, "private": 10})
    with pytest.raises(ValueError, match=r"disc/odd_corrupt\.png"):
        run_prepare(cfg)
    assert not (tmp_path / "runs").exists()


def test_rgb_folder_is_prepared_at_image_size_with_skipped_files_listed(tmp_path):
    cfg = _config(tmp_path, source="image_folder", path=str(make_rgb_folder(tmp_path / "pets", 8)), channels=3,
                  image_size=16, on_bad_image="skip", public_shift="none", splits={"public": 0, "private": 10})
    summary = run_prepare(cfg)
    assert summary["channels"] == 3 and summary["image_shape"] == [16, 16, 3] and summary["skipped"] == 1
    record = json.loads((tmp_path / "runs" / "prepare" / summary["stage_hash"] / "prepared.json").read_text())
    assert len(record["skipped"]) == 1 and record["skipped"][0]["name"].endswith("disc/odd_corrupt.png")
    splits = load_splits(cfg)
    assert splits.private.read().shape == (10, 16, 16, 3) and splits.private.channels == 3
    assert splits.test.read().shape[1:] == (16, 16, 3) and splits.class_names == ["disc", "square", "stripes"]
    assert len(splits.private) + len(splits.test) <= 3 * 8 + 4
