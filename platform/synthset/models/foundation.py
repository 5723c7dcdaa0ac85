"""The foundation text-to-image model: Stable Diffusion's structure, small or real.

Production loads Stable Diffusion 2.x with ``load_foundation("stabilityai/stable-diffusion-2-1")``.
The embedded default builds the same structure at a size two CPU cores can pretrain
(``build_foundation``): a CLIP tokenizer from a local vocabulary, a small CLIPTextModel, a small
AutoencoderKL and a UNet2DConditionModel, saved with ``save_pretrained`` and loaded back through
the very same ``load_foundation`` / ``StableDiffusionPipeline.from_pretrained`` call.
"""

from __future__ import annotations

import re
import string
import tempfile
from importlib import resources
from pathlib import Path

import torch

from synthset.config import FoundationArch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def vocabulary_words() -> list[str]:
    """The words the embedded tokenizer knows as whole tokens (``vocabulary.txt``)."""
    text = resources.files("synthset.models").joinpath("vocabulary.txt").read_text()
    return [w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def _clip_pieces(text: str) -> list[str]:
    # The split CLIP's tokenizer makes before BPE (letters, single digits, punctuation runs).
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def train_bpe(pieces: list[str], suffix: str = "</w>") -> list[tuple[str, str]]:
    """BPE merges that make each of ``pieces`` one token: repeatedly merge the most frequent adjacent
    pair, ties broken by the pair's text, until no word has two symbols left.

    Written out rather than taken from ``tokenizers``' ``BpeTrainer``, which breaks ties between
    equally frequent pairs by ids drawn from a randomly seeded hash map: the same words gave another
    merge order and other token ids in every process, so the foundation's text encoder (and every
    image after it) differed between two runs of one config.
    """
    words = [list(p[:-1]) + [p[-1] + suffix] for p in sorted(set(pieces)) if p]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def build_tokenizer(words: list[str], save_dir: str | Path, max_length: int = 16):
    """A CLIP tokenizer in which each of ``words`` is one token, saved to ``save_dir``.

    Every printable ASCII character stays in the vocabulary (alone and word-final), so any prompt
    tokenizes; the listed words (and every piece of them that CLIP's pre-tokenizer splits off) become
    single tokens. The same words give the same vocabulary, ids and merges in every process.
    """
    from transformers import CLIPTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(c for c in string.printable if not c.isspace())
    merges = train_bpe([p for w in words for p in _clip_pieces(w)])
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_foundation(arch: FoundationArch, seed: int = 0):
    """An untrained StableDiffusionPipeline with the embedded default's small components."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(vocabulary_words(), tmp, max_length=arch.max_prompt_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width,
        intermediate_size=2 * arch.text_width, num_hidden_layers=arch.text_layers,
        num_attention_heads=max(1, arch.text_width // 16), max_position_embeddings=arch.max_prompt_tokens,
        projection_dim=arch.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    n_vae = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=arch.image_channels, out_channels=arch.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(arch.vae_channels), layers_per_block=1,
        latent_channels=arch.latent_channels, norm_num_groups=arch.norm_groups,
        sample_size=arch.image_size, mid_block_add_attention=False,
    )
    n_unet = len(arch.unet_channels)
    attn = arch.unet_attention_levels
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n_unet))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n_unet)))
    unet = UNet2DConditionModel(
        sample_size=arch.image_size // 2 ** (n_vae - 1), in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(arch.unet_channels), layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_width, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_groups,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=2, steps_offset=1,
        # The cosine schedule reaches SNR ≈ 0 at t = 999, where an ε-prediction step is ill-conditioned
        # (its x0 estimate divides by √ᾱ ≈ 0): clip λ(t) as diffusers recommends for this schedule.
        lambda_min_clipped=-5.1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_foundation(path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a text-to-image pipeline from a hub id or a local directory (safetensors only).

    This is the one loading path for every stage: SD 2.1 in production, the embedded model here.
    """
    from diffusers import StableDiffusionPipeline

    local = Path(path)
    if not local.exists() and (path.startswith(("/", ".")) or local.suffix):
        raise FileNotFoundError(f"foundation.path: no model at {path!r}")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, torch_dtype=dtype or torch.float32, use_safetensors=True, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
