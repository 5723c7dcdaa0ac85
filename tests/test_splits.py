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
