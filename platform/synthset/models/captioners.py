"""Captioners: one short description per image, for TCKR's and CaptionPrompt's ``"{class}: {caption}"``.

Production captions with BLIP-2 (or any transformers image-text-to-text model) by hub id or local
directory::

    captioner = load_captioner("Salesforce/blip2-opt-2.7b", device="cuda", dtype=torch.bfloat16)
    captioner.caption(images)  # → ["a white sneaker on a white background", ...]

No pretrained captioner exists in the embedded default, and a randomly initialised BLIP-2 would
only produce noise, so ``load_captioner("properties")`` returns ``PropertyCaptioner``: an honest,
instance-specific captioner that measures four properties of the item in each image (size,
aspect, brightness, texture) and words each as one of three tertile words, e.g.
``"a large narrow bright smooth item"``. Every word is a whole token of the embedded
foundation tokenizer (``vocabulary.txt``), and the foundation model is pretrained with these
captions (``stages/foundation.py``), so caption prompts mean something to it.

``build_blip2`` saves a tiny randomly initialised BLIP-2 (and its processor, with a tokenizer
built from the local vocabulary) so the transformers path runs offline in tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PROPERTIES = "properties"

# The captioner measures at Fashion-MNIST's resolution (other sizes are resized to it first), so
# gradient-based texture means the same at any input size.
MEASURE_SIZE = 28
# A pixel belongs to the item when it differs from the background (median of the image's one-pixel
# frame) by more than this many grey levels.
ITEM_THRESHOLD = 30
# (words, cuts): a value below cuts[0] gets words[0], below cuts[1] words[1], else words[2].
# The cuts are the tertiles of each property over the 60,000 Fashion-MNIST training images, measured
# with ``image_properties`` (``python -m synthset.models.captioners`` prints them), so each word
# covers about a third of the real data.
PROPERTY_WORDS: dict[str, tuple[tuple[str, str, str], tuple[float, float]]] = {
    # fraction of the image covered by the item
    "size": (("small", "medium", "large"), (0.36, 0.537)),
    # width / height of the item's bounding box
    "aspect": (("narrow", "square", "wide"), (0.714, 1.077)),
    # mean grey level (0-255) of the item's pixels
    "brightness": (("dark", "grey", "bright"), (145.2, 184.5)),
    # mean absolute difference (grey levels) between neighbouring pixels inside the item
    "texture": (("smooth", "textured", "patterned"), (22.65, 30.39)),
}
EMPTY_CAPTION = "an empty image"


def caption_words() -> list[str]:
    """Every word ``PropertyCaptioner`` can write."""
    words = ["a", "item", *EMPTY_CAPTION.split()]
    for names, _ in PROPERTY_WORDS.values():
        words += names
    return list(dict.fromkeys(words))


def _to_grey(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, C]) → float32 (N, MEASURE_SIZE, MEASURE_SIZE) grey levels."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"captioner: expected uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4:  # RGB(A) → luminance, as PIL's "L" mode
        images = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        images = np.clip(images.round(), 0, 255).astype(np.uint8)
    if images.ndim != 3:
        raise ValueError(f"captioner: expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if images.shape[1:] != (MEASURE_SIZE, MEASURE_SIZE):
        images = np.stack([np.asarray(Image.fromarray(im).resize((MEASURE_SIZE, MEASURE_SIZE), Image.BILINEAR))
                           for im in images]) if len(images) else np.zeros((0, MEASURE_SIZE, MEASURE_SIZE), np.uint8)
    return images.astype(np.float32)


def image_properties(images: np.ndarray) -> dict[str, np.ndarray]:
    """Measured properties of uint8 images (N, H, W[, C]): arrays of N values each (NaN for blank images).

    ``size`` is the fraction of pixels on the item, ``aspect`` its bounding box's width / height,
    ``brightness`` the mean grey level of its pixels, ``texture`` the mean absolute difference
    between horizontally or vertically adjacent item pixels.
    """
    x = _to_grey(images)
    frame = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    background = np.median(frame, axis=1)[:, None, None] if len(x) else np.zeros((0, 1, 1), np.float32)
    item = np.abs(x - background) > ITEM_THRESHOLD
    count = item.sum(axis=(1, 2)).astype(np.float64)
    blank = count == 0
    safe = np.maximum(count, 1)
    rows, cols = item.any(axis=2), item.any(axis=1)

    def extent(mask: np.ndarray) -> np.ndarray:
        first = mask.argmax(axis=1)
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        return (last - first + 1).astype(np.float64)

    pair_y, pair_x = item[:, 1:] & item[:, :-1], item[:, :, 1:] & item[:, :, :-1]
    diff = (np.abs(np.diff(x, axis=1)) * pair_y).sum(axis=(1, 2)) + (np.abs(np.diff(x, axis=2)) * pair_x).sum(axis=(1, 2))
    pairs = pair_y.sum(axis=(1, 2)) + pair_x.sum(axis=(1, 2))
    props = {
        "size": count / (x.shape[1] * x.shape[2]) if len(x) else np.zeros(0),
        "aspect": extent(cols) / np.maximum(extent(rows), 1),
        "brightness": (x * item).sum(axis=(1, 2)) / safe,
        "texture": diff / np.maximum(pairs, 1),
    }
    return {k: np.where(blank, np.nan, v) for k, v in props.items()}


def describe_images(images: np.ndarray) -> list[str]:
    """One deterministic caption per uint8 image (N, H, W[, C]), e.g. ``"a small wide dark textured item"``."""
    props = image_properties(images)
    words = {}
    for name, (names, cuts) in PROPERTY_WORDS.items():
        words[name] = np.array(names)[np.searchsorted(np.asarray(cuts), props[name], side="right").clip(0, 2)]
    captions = []
    for i in range(len(props["size"])):
        if np.isnan(props["size"][i]):
            captions.append(EMPTY_CAPTION)
        else:
            captions.append("a " + " ".join(str(words[n][i]) for n in PROPERTY_WORDS) + " item")
    return captions


def describe_image(image: np.ndarray) -> str:
    """The caption of one uint8 image (H, W[, C]); see ``describe_images``."""
    return describe_images(np.asarray(image)[None])[0]


class PropertyCaptioner:
    """The embedded captioner: words measured image properties (no model, no randomness)."""

    name = PROPERTIES

    def caption(self, images: np.ndarray) -> list[str]:
        return describe_images(images)


def _to_pil(image: np.ndarray):
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image).convert("RGB")


class TransformersCaptioner:
    """A transformers image-text-to-text model (BLIP-2, BLIP, GIT, …) with its processor, greedy decoding."""

    def __init__(self, model, processor, name: str, max_new_tokens: int = 20, prompt: str | None = None):
        self.model, self.processor, self.name = model, processor, name
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    @torch.no_grad()
    def caption(self, images: np.ndarray) -> list[str]:
        """Captions of uint8 images (N, H, W[, C]) in one batched ``generate`` call."""
        if len(images) == 0:
            return []
        pil = [_to_pil(im) for im in images]
        kwargs = {"images": pil, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(pil)
        inputs = self.processor(**kwargs).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        prompt_ids = inputs.get("input_ids")
        # Decoder-only models return the prompt before the new tokens: keep only what was generated.
        if prompt_ids is not None and out.shape[1] >= prompt_ids.shape[1] \
                and torch.equal(out[:, :prompt_ids.shape[1]], prompt_ids):
            out = out[:, prompt_ids.shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def check_captioner(name_or_path: str) -> None:
    """Fail early when ``data.caption.captioner`` names a local model that is not there."""
    local = Path(name_or_path)
    if name_or_path != PROPERTIES and not local.exists() and (name_or_path.startswith(("/", ".")) or local.suffix):
        raise FileNotFoundError(f"data.caption.captioner: no model at {name_or_path!r} "
                                f"(use {PROPERTIES!r}, a hub id, or a directory)")


def load_captioner(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None,
                   max_new_tokens: int = 20, prompt: str | None = None):
    """``"properties"`` → ``PropertyCaptioner``; else a transformers captioner from a hub id or directory.

    The model is loaded with ``AutoModelForImageTextToText`` (transformers ≥ 5 maps BLIP-2 there;
    ``AutoModelForVision2Seq`` is gone) and ``AutoProcessor``, safetensors only, in ``dtype`` on
    ``device``. Both expose ``caption(images) -> list[str]``.
    """
    check_captioner(name_or_path)
    if name_or_path == PROPERTIES:
        return PropertyCaptioner()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or torch.float32,
                                                        use_safetensors=True)
    return TransformersCaptioner(model.to(device).eval(), processor, name_or_path, max_new_tokens, prompt)


def caption_images(captioner, images: np.ndarray, batch_size: int) -> list[str]:
    """Captions of ``images`` in batches of ``batch_size`` (any captioner)."""
    return [c for i in range(0, len(images), batch_size) for c in captioner.caption(images[i:i + batch_size])]


def build_blip2(save_dir: str | Path, image_size: int = 32, width: int = 32, num_query_tokens: int = 4,
                seed: int = 0) -> Path:
    """Save a tiny randomly initialised BLIP-2 (ViT + Q-Former + OPT) and its processor to ``save_dir``.

    Its tokenizer is the embedded foundation tokenizer (``vocabulary.txt``), so nothing is
    downloaded. It captions gibberish; it exists so the BLIP-2 code path runs in tests.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    try:  # transformers 5 without torchvision: the PIL backend, named explicitly to avoid a warning
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    from synthset.models.foundation import build_tokenizer, vocabulary_words

    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(vocabulary_words(), save_dir, max_length=64)
    processor = Blip2Processor(ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer,
                               num_query_tokens=num_query_tokens)  # adds the "<image>" token
    heads = max(1, width // 16)
    config = Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                           num_attention_heads=heads, image_size=image_size, patch_size=max(1, image_size // 4)),
        qformer_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=heads, encoder_hidden_size=width, vocab_size=len(tokenizer)),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=width, ffn_dim=2 * width, num_hidden_layers=1,
                              num_attention_heads=heads, word_embed_proj_dim=width, max_position_embeddings=128,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id).to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(save_dir, safe_serialization=True)
    processor.save_pretrained(save_dir)
    return save_dir


if __name__ == "__main__":  # print the tertiles PROPERTY_WORDS's cuts were taken from
    from synthset.data.sources import load_fashion_mnist

    train, _ = load_fashion_mnist(None, False, "~/.cache/synthset/fashion-mnist")
    for name, values in image_properties(train.images).items():
        print(name, np.round(np.nanquantile(values, [1 / 3, 2 / 3]), 3).tolist())
