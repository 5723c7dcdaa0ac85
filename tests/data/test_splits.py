import json

import numpy as np
import pytest

from synthset.config import DataConfig
from synthset.data.splits import fit_images, make_splits, split_indices, write_splits


def test_split_indices_are_disjoint_seeded_and_sized():
    pub, priv = split_indices(1000, 300, 200, seed=3)
    assert len(pub) == 300 and len(priv) == 200
    assert not set(pub) & set(priv)
    again = split_indices(1000, 300, 200, seed=3)
    np.testing.assert_array_equal(pub, again[0])
    assert not np.array_equal(priv, split_indices(1000, 300, 200, seed=4)[1])


def test_split_larger_than_source_is_rejected():
    with pytest.raises(ValueError, match=r"data.splits: public \(900\) \+ private \(200\)"):
        split_indices(1000, 900, 200, seed=0)


def test_digits_splits_are_recorded(tmp_path):
    splits = make_splits(DataConfig(source="digits", image_size=16, splits={"public": 600, "private": 400}))
    assert len(splits.public) == 600 and len(splits.private) == 400 and len(splits.test) > 300
    write_splits(splits, tmp_path / "splits.json")
    rec = json.loads((tmp_path / "splits.json").read_text())
    assert sorted(rec["public"]) == splits.public_index.tolist()
    assert not set(rec["public"]) & set(rec["private"])


def test_empty_private_class_is_rejected():
    # A private split of 10 digits cannot hold every class with this seed → the error names the field.
    for seed in range(50):
        try:
            make_splits(DataConfig(source="digits", splits={"public": 0, "private": 10, "seed": seed}))
        except ValueError as err:
            assert "data.splits.private" in str(err)
            return
    pytest.fail("no seed produced a private split missing a class")


def test_fit_images_pads_small_differences_and_resizes_large_ones():
    imgs = np.full((2, 28, 28), 200, np.uint8)
    padded = fit_images(imgs, 32)
    assert padded.shape == (2, 32, 32) and padded[:, :2].max() == 0 and padded[:, 2:30, 2:30].min() == 200
    assert fit_images(np.zeros((1, 8, 8), np.uint8), 32).shape == (1, 32, 32)


def test_public_shift_changes_public_images_only():
    from synthset.data.sources import load_digits_fixture

    train, _ = load_digits_fixture()
    plain = make_splits(DataConfig(source="digits", public_shift="none", splits={"public": 600, "private": 400}))
    inverted = make_splits(DataConfig(source="digits", public_shift="invert", splits={"public": 600, "private": 400}))
    np.testing.assert_array_equal(plain.public_index, inverted.public_index)
    np.testing.assert_array_equal(inverted.public.images, 255 - train.images[inverted.public_index])
    np.testing.assert_array_equal(inverted.public_unshifted.images, train.images[inverted.public_index])
    np.testing.assert_array_equal(inverted.private.images, train.images[inverted.private_index])
    np.testing.assert_array_equal(inverted.private.images, plain.private.images)
    np.testing.assert_array_equal(inverted.test.images, plain.test.images)
    assert inverted.record()["public_shift"] == "invert"


def test_shift_images_kinds():
    from synthset.data.splits import SHRINK_SCALE, shift_images

    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[:, 2:26, 4:24] = 200
    imgs[:, 2:6] = 255  # a bright top edge, to see flips
    shrunk = shift_images(imgs, "shrink")
    rows = np.flatnonzero(shrunk[0].max(axis=1) > 30)
    assert shrunk.shape == imgs.shape and shrunk.dtype == np.uint8
    assert abs(len(rows) - SHRINK_SCALE * 24) <= 1.5 and rows[0] > 2 and rows[-1] < 25
    light = np.full((1, 20, 20, 3), 255, np.uint8)
    light[:, 5:15, 5:15] = 0
    assert (shift_images(light, "shrink")[0, 0] == 255).all()  # filled with the image's own background
    flipped = shift_images(imgs, "flip")
    assert flipped[0, 22:26].min() == 255 and flipped[0, 2:6].max() == 200
    blurred = shift_images(imgs, "blur")
    assert 0 < blurred[0, 1, 10] < 200 and blurred[0, 14, 14] == 200
    assert shift_images(imgs, "none") is imgs
    np.testing.assert_array_equal(shift_images(imgs, "invert"), 255 - imgs)
    with pytest.raises(ValueError, match="data.public_shift"):
        shift_images(imgs, "rotate")


def test_public_classes_hold_classes_out_of_the_public_split_only():
    cfg = DataConfig(source="digits", public_shift="none", public_classes=["zero", "one", "two"],
                     splits={"public": 600, "private": 400})
    splits = make_splits(cfg)
    full = make_splits(DataConfig(source="digits", public_shift="none", splits={"public": 600, "private": 400}))
    assert set(np.unique(splits.public.labels)) == {0, 1, 2} and 0 < len(splits.public) < 600
    assert set(splits.public_index) <= set(full.public_index)
    np.testing.assert_array_equal(splits.private_index, full.private_index)
    assert len(np.unique(splits.private.labels)) == 10
    assert splits.record()["public_classes"] == ["zero", "one", "two"]
    with pytest.raises(ValueError, match=r"data.public_classes: unknown class\(es\) \['cat'\]"):
        make_splits(DataConfig(source="digits", public_classes=["cat"], splits={"public": 60, "private": 400}))


def test_sources_without_a_test_set_give_up_a_fixed_fraction_by_key():
    from synthset.data.splits import in_test_set

    keys = np.array([f"cls/{i:04d}.png" for i in range(2000)])
    mask = in_test_set(keys, 0.2)
    assert 300 < mask.sum() < 500                                        # about 20%
    more = np.concatenate([keys, [f"new/{i}.png" for i in range(500)]])
    np.testing.assert_array_equal(in_test_set(more, 0.2)[:2000], mask)    # new images move no old one
    np.testing.assert_array_equal(in_test_set(keys[::-1], 0.2), mask[::-1])  # a function of the key, not the order
