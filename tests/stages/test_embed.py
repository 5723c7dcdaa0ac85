"""The embed stage's encoders: tiny DINOv2 and CLIP vision models load by path; bad paths fail early."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close_scaled
from synthset.models.encoders import PUBLIC_CNN, check_encoder, read_embeddings
from synthset.stages.embed import balanced_subset, embed_images, encoder_function


def _tiny_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(path, safe_serialization=True)
    return 32


def _tiny_clip_vision(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                           image_size=16, patch_size=8, projection_dim=12)
    torch.manual_seed(0)
    CLIPVisionModel(cfg).save_pretrained(path, safe_serialization=True)
    return 24


@pytest.mark.parametrize("build", [_tiny_dinov2, _tiny_clip_vision], ids=["dinov2", "clip_vision"])
def test_a_tiny_transformers_encoder_loads_by_path_and_embeds(build, tmp_path, one_thread):
    path = tmp_path / "encoder"
    width = build(path)
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    check_encoder(str(path))  # a directory with config.json passes
    fn = encoder_function(str(path))
    gray = torch.rand(5, 1, 28, 28) * 2 - 1  # grayscale at another size: brought to RGB at the model's size
    emb = embed_images(fn, gray, batch_size=2)
    assert emb.shape == (5, width) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # Different images, different embeddings; the same image, the same embedding (eval mode, no dropout).
    assert not np.allclose(emb[0], emb[1])
    np.testing.assert_allclose(embed_images(fn, gray[:1], 1)[0], emb[0], rtol=1e-4, atol=1e-5)
    # The features are the model's own on [0, 1] RGB at its size with ImageNet normalisation
    # (feature_extractor's contract), computed here from the model directly. The function resizes
    # bilinearly; the RGB images at the model's size check the rest without depending on that choice.
    rgb = torch.rand(3, 3, 16, 16) * 2 - 1
    for images, expected in ((gray, _reference_features(path, gray)), (rgb, _reference_features(path, rgb))):
        # The same float32 maths in other batches: rounding is relative to the magnitudes summed
        # (assert_close_scaled's defaults); dropping the normalisation moves every feature by O(1).
        assert_close_scaled(embed_images(fn, images, batch_size=2), expected)


def _reference_features(path, images):
    """feature_extractor's documented contract, from transformers directly: [-1, 1] → [0, 1], grayscale
    repeated to RGB, resized to the model's ``image_size``, normalised with transformers' ImageNet mean
    and std; then ``get_image_features``, else ``pooler_output``, else the CLS token."""
    import torch.nn.functional as F
    from transformers import AutoModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = AutoModel.from_pretrained(path).eval()
    size = model.config.image_size
    x = (images + 1) / 2
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            return model.get_image_features(pixel_values=x).numpy()
        out = model(pixel_values=x)
        return (out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]).numpy()


def test_a_missing_encoder_path_fails_naming_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthesis.rcdm.embed.encoder"):
        check_encoder(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_encoder(str(tmp_path / "empty"))
    check_encoder(PUBLIC_CNN)
    check_encoder("facebook/dinov2-base")  # a hub id is not checked offline


def test_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    a = balanced_subset(labels, 9, 3, seed=1)
    assert np.array_equal(a, balanced_subset(labels, 9, 3, seed=1)) and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3]
    assert not np.array_equal(a, balanced_subset(labels, 9, 3, seed=2))
    assert np.bincount(labels[balanced_subset(labels, 10, 3, 0)]).tolist() == [4, 3, 3]
    assert np.array_equal(balanced_subset(labels, None, 3, 0), np.arange(60))


def test_the_embed_stage_writes_safetensors_with_a_public_cnn(tiny_config, one_thread):
    """The embedded default end to end at unit scale: a CNN trained on the public split embeds a subset."""
    from synthset.config import load_config
    from synthset.stages.embed import run_embed

    from conftest import ROOT, have_fashion_mnist, require

    require(have_fashion_mnist(), "dataset-fashion-mnist not installed")
    root = tiny_config.output.root
    cfg = load_config(ROOT / "conf" / "tiny.yaml", [f"output.root={root}", "synthesis.method=rcdm",
                                                    "data.splits.public=300", "data.splits.private=200",
                                                    "synthesis.rcdm.embed.real_images=50",
                                                    "synthesis.rcdm.embed.public_epochs=1",
                                                    "synthesis.rcdm.embed.public_width=4"])
    summary = run_embed(cfg)
    arrays = read_embeddings(summary["embeddings"])
    assert summary["embeddings"].endswith(".safetensors") and summary["encoder"].endswith("encoder")
    assert arrays["embeddings"].shape == (50, summary["dim"]) and np.bincount(arrays["labels"]).tolist() == [5] * 10
    stage = Path(summary["embeddings"]).parent
    assert not [p for p in stage.rglob("*") if p.suffix in (".pt", ".pkl", ".bin", ".pth")]  # nothing pickled
    assert list((stage / "encoder").glob("*.safetensors"))
    again = run_embed(cfg)
    assert again.get("reused") and again["embeddings"] == summary["embeddings"]
