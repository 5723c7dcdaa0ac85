"""Captioners (models/captioners.py) and the caption stage (stages/caption.py)."""

import json
import os

import numpy as np
import pytest
import torch

from synthset.models.captioners import (PROPERTY_WORDS, build_blip2, caption_images, caption_words, describe_image,
                                        describe_images, image_properties, load_captioner)
from synthset.models.foundation import build_tokenizer, vocabulary_words


def item(size: tuple[int, int], value: int, canvas: int = 28, texture: bool = False, background: int = 0) -> np.ndarray:
    """A synthetic image: a ``size`` (h, w) rectangle of grey ``value`` centred on ``background``."""
    img = np.full((canvas, canvas), background, np.uint8)
    h, w = size
    top, left = (canvas - h) // 2, (canvas - w) // 2
    patch = np.full((h, w), value, np.uint8)
    if texture:
        patch[::2] = value // 3  # stripes: strong vertical gradients inside the item
    img[top:top + h, left:left + w] = patch
    return img


def test_captions_word_the_measured_properties():
    small_dark = item((8, 12), 90)
    large_bright = item((26, 26), 230)
    assert describe_image(small_dark) == "a small wide dark smooth item"
    assert describe_image(large_bright) == "a large square bright smooth item"
    assert describe_image(item((26, 10), 160, texture=True)).split()[2:5] == ["narrow", "dark", "patterned"]
    props = image_properties(np.stack([small_dark, large_bright]))
    np.testing.assert_allclose(props["size"], [8 * 12 / 784, 26 * 26 / 784])
    np.testing.assert_allclose(props["aspect"], [12 / 8, 1.0])
    np.testing.assert_allclose(props["brightness"], [90, 230])
    np.testing.assert_allclose(props["texture"], [0, 0])


def test_captions_are_deterministic_and_size_and_colour_independent():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8) * (rng.random((6, 28, 28)) > 0.5)
    images = images.astype(np.uint8)
    images[:, :1], images[:, -1:], images[:, :, :1], images[:, :, -1:] = 0, 0, 0, 0
    assert describe_images(images) == describe_images(images.copy())
    assert describe_images(images[:3]) + describe_images(images[3:]) == describe_images(images)
    big = item((52, 20), 210, canvas=56)  # same item at twice the resolution
    assert describe_image(big) == describe_image(item((26, 10), 210))
    rgb = np.repeat(item((26, 10), 210)[..., None], 3, axis=-1)
    assert describe_image(rgb) == describe_image(item((26, 10), 210)) == describe_image(rgb[..., :1])
    # A dark item on a light background is found against its own background.
    assert describe_image(item((26, 26), 40, background=255)) == "a large square dark smooth item"
    assert describe_image(np.zeros((28, 28), np.uint8)) == "an empty image"
    with pytest.raises(ValueError, match="uint8"):
        describe_images(np.zeros((1, 28, 28), np.float32))


def test_every_caption_word_is_one_foundation_token(tmp_path):
    tok = build_tokenizer(vocabulary_words(), tmp_path)
    for word in caption_words():
        assert tok.tokenize(word) == [f"{word}</w>"], word
    # The longest TCKR prompt fits the embedded text encoder's 16 positions.
    longest = "t-shirt: " + "a " + " ".join(max(w, key=len) for w, _ in PROPERTY_WORDS.values()) + " item"
    assert len(tok(longest).input_ids) <= 16


@pytest.fixture(scope="module")
def fashion_captions():
    from conftest import have_fashion_mnist, require

    require(have_fashion_mnist(), "dataset-fashion-mnist not installed")
    from synthset.data.sources import load_fashion_mnist

    train, _ = load_fashion_mnist(None, False, "~/.cache/synthset/fashion-mnist")
    return train, describe_images(train.images[:3000])


def test_each_word_splits_real_data_into_thirds(fashion_captions):
    _, captions = fashion_captions
    words = np.array([c.split()[1:5] for c in captions])
    for j, (names, _) in enumerate(PROPERTY_WORDS.values()):
        shares = [(words[:, j] == w).mean() for w in names]
        assert all(0.2 < s < 0.47 for s in shares), (names, shares)
    assert len(set(captions)) > 40


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    return build_blip2(tmp_path_factory.mktemp("blip2"))


def test_tiny_blip2_saves_safetensors_and_captions_through_the_auto_classes(tiny_blip2):
    files = {p.name for p in tiny_blip2.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert "processor_config.json" in files or "preprocessor_config.json" in files
    captioner = load_captioner(str(tiny_blip2), "cpu", torch.float32, max_new_tokens=6)
    assert type(captioner.model).__name__ == "Blip2ForConditionalGeneration"
    images = np.stack([item((8, 12), 90), item((26, 26), 230)])
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert all(len(c.split()) <= 6 for c in captions) and "<image>" not in "".join(captions)
    again = load_captioner(str(tiny_blip2), "cpu", max_new_tokens=6)
    assert caption_images(again, images, batch_size=1) == captions  # batching and reloading change nothing
    with_prompt = load_captioner(str(tiny_blip2), "cpu", max_new_tokens=3, prompt="a photo of")
    assert len(with_prompt.caption(images[:1])) == 1


def test_bad_captioner_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.caption.captioner"):
        load_captioner(str(tmp_path / "missing"))
    assert load_captioner("properties").caption(np.stack([item((8, 12), 90)])) == ["a small wide dark smooth item"]


def test_caption_prompts_are_mixed_per_step_and_seeded():
    from synthset.diffusion.text_to_image import caption_prompts, choose_prompts

    prompts = caption_prompts(np.array([0, 1]), ["bag", "coat"], ["a small wide dark smooth item", "x"],
                              "{class}: {caption}")
    assert prompts == ["bag: a small wide dark smooth item", "coat: x"]
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        caption_prompts(np.array([0, 1]), ["bag", "coat"], ["x"], "{class}: {caption}")
    n = 2000
    class_ids, cap_ids, idx = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), torch.arange(n)

    def draw(p, dropout, seed):
        return choose_prompts(idx, class_ids, cap_ids, p, dropout, 2, torch.Generator().manual_seed(seed))

    a = draw(0.5, 0.1, 0)
    assert torch.equal(a, draw(0.5, 0.1, 0)) and not torch.equal(a, draw(0.5, 0.1, 1))
    shares = torch.bincount(a, minlength=3).float() / n
    assert abs(shares[0] - 0.45) < 0.04 and abs(shares[1] - 0.45) < 0.04 and abs(shares[2] - 0.1) < 0.03
    assert set(draw(0.0, 0.0, 0).tolist()) == {0} and set(draw(1.0, 0.0, 0).tolist()) == {1}
    none = choose_prompts(idx, class_ids, None, 0.5, 0.0, 2, torch.Generator().manual_seed(0))
    assert set(none.tolist()) == {0}


@pytest.mark.slow
def test_caption_stage_writes_resumable_parts_with_ray(tmp_path):
    from synthset.config import load_config
    from synthset.data.splits import make_splits
    from conftest import ROOT
    from synthset import storage
    from synthset.stages.caption import caption_dir, read_captions, run_caption
    from synthset.stages.common import init_ray

    cfg = load_config(ROOT / "conf" / "tiny.yaml", [
        f"output.root={tmp_path}", "data.source=digits", "data.splits.public=200", "data.splits.private=300",
        "data.caption.part_size=100", "data.caption.batch_size=64", "ray.num_cpus=2"])
    init_ray(cfg)
    summary = run_caption(cfg)
    captions = read_captions(summary["captions"])
    private = make_splits(cfg.data).private
    assert captions == describe_images(private.images) and summary["num_captions"] == 300
    rows = [json.loads(line) for line in open(summary["captions"])]
    assert [r["class_id"] for r in rows] == private.labels.tolist()
    # A lost part is redone alone; a complete stage is reused; the public shift does not change the key.
    stage = caption_dir(cfg)
    storage.write_bytes(stage.path("parts", "part-000001.jsonl"), b"")
    os.remove(stage.path("_SUCCESS.json"))
    again = run_caption(cfg)
    assert again["captioned_now"] == 100 and read_captions(again["captions"]) == captions
    assert run_caption(cfg)["reused"]
    assert caption_dir(cfg.model_copy(update={"data": cfg.data.model_copy(update={"public_shift": "blur"})})).hash \
        == stage.hash
