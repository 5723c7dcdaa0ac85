import numpy as np
import pytest
import torch

from synthset.diffusion.text_to_image_sampler import generate_batch
from synthset.methods.class_prompt import plan_requests
from synthset.models.foundation import build_tokenizer, load_foundation, vocabulary_words

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def test_tokenizer_knows_every_vocabulary_word_as_one_token(tmp_path):
    tok = build_tokenizer(vocabulary_words(), tmp_path)
    for word in ["shirt", "ankle", "boot", "photo", "sneaker", "dark", "striped"]:
        assert tok.tokenize(word) == [f"{word}</w>"]
    assert tok.tokenize("t-shirt") == ["t</w>", "-</w>", "shirt</w>"]
    assert len(tok.tokenize("zebra")) > 1 and tok.unk_token_id not in tok("zebra").input_ids[1:-1]


def test_save_pretrained_round_trip_gives_identical_images(tiny_pipeline_dir):
    files = {p.suffix for p in tiny_pipeline_dir.rglob("*") if p.is_file()}
    assert ".safetensors" in files and ".bin" not in files and ".pt" not in files
    pipe = load_foundation(str(tiny_pipeline_dir))
    requests = plan_requests(0, 4, 0, NAMES, "a photo of a {class}")
    a = generate_batch(pipe, requests, num_inference_steps=2, guidance_scale=2.0)
    b = generate_batch(load_foundation(str(tiny_pipeline_dir)), requests, num_inference_steps=2, guidance_scale=2.0)
    assert a.shape == (4, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_each_image_depends_only_on_its_request(tiny_pipeline_dir):
    pipe = load_foundation(str(tiny_pipeline_dir))
    requests = plan_requests(0, 6, 0, NAMES, "a photo of a {class}")
    together = generate_batch(pipe, requests, 2, 2.0)
    alone = generate_batch(pipe, requests[3:4], 2, 2.0)
    # ±1 grey level: batched vs alone GEMMs round differently (~1e-5 relative, ≪ 1/255), which can
    # tip a pixel over one uint8 boundary, never two.
    assert np.abs(together[3].astype(int) - alone[0].astype(int)).max() <= 1
    assert not np.array_equal(together[0], together[1])


def test_classifier_free_guidance_changes_the_output(tiny_pipeline_dir):
    pipe = load_foundation(str(tiny_pipeline_dir))
    req = plan_requests(0, 2, 0, NAMES, "a photo of a {class}")
    torch.manual_seed(0)
    assert not np.array_equal(generate_batch(pipe, req, 2, 1.0), generate_batch(pipe, req, 2, 5.0))


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="foundation.path"):
        load_foundation(str(tmp_path / "nope"))


def test_pretraining_with_caption_prompts_is_seeded(tiny_pipeline_dir):
    from diffusers import DDPMScheduler

    from synthset.diffusion.text_to_image import caption_prompts, train_unet

    labels = np.arange(8) % len(NAMES)
    latents = torch.randn((8, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of a {NAMES[c]}" for c in labels]
    captioned = caption_prompts(labels, NAMES, ["a small wide dark smooth item"] * 4 + ["a large square bright patterned item"] * 4,
                                "{class}: {caption}")

    pipe = load_foundation(str(tiny_pipeline_dir))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    start = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.unet, pipe.text_encoder)}

    def losses(probability, captions=captioned):
        for module, state in start.items():
            module.load_state_dict(state)
        return train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, sched, latents, prompts, 2, 4, 1e-3, 0.1, 0,
                          ema_decay=None, captioned_prompts=captions, caption_probability=probability)

    mixed = losses(0.5)
    assert mixed == losses(0.5)
    assert mixed != losses(0.0)  # caption prompts are what some steps see
    with pytest.raises(ValueError, match="3 caption prompts for 8 images"):
        train_unet(None, None, None, None, latents, prompts, 1, 4, 1e-3, 0.1, 0, captioned_prompts=captioned[:3])


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """Token ids and merge order are a function of the words: two fresh interpreters (each with its own
    hash seeds, Python's and the Rust tokenizers') save the same tokenizer, so a config's foundation is
    reproducible. The BpeTrainer of `tokenizers` broke ties by hash order and failed this."""
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import sys; sys.path.insert(0, sys.argv[2]); "
              "from synthset.models.foundation import build_tokenizer, vocabulary_words; "
              "build_tokenizer(vocabulary_words(), sys.argv[1])")
    saved = []
    for i in range(2):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", script, str(out), str(ROOT / "platform")], check=True)
        saved.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert saved[0].keys() == saved[1].keys() and saved[0] == saved[1]
