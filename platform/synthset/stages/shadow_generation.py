"""A LoRA method's generation repeated on a shadow's half: re-adapt the LoRAs, re-generate the set.

TCKR, DataDream and LoFT adapt LoRAs of the foundation UNet to the private images (``Method.lora``),
so the synthetic set itself depends on which images were private. The faithful ``pipeline`` shadow of
their Students (Carlini et al. 2022, Algorithm 1: a shadow repeats the target's whole training on its
half) therefore repeats the adaptation and the generation per half before the Teacher and Student
recipes (``eval/shadow_training.py: pipeline_shadow_logits``). ``regenerate_synthetic_set`` does
that in one process, without Ray or stage caches, from the adapt and synthesis stages' own pieces:

* ``stages/adapt.py``: ``select_shots`` picks ``adapt.shots_per_class`` shots per class from the half,
  as from the private split; ``shot_prompts`` gives their training prompts; ``LoraAdaptation.owners``
  their LoRAs; ``train_bank`` trains each bank of ``adapt.loras_per_bank`` LoRAs; ``lora_table`` writes
  the table the method plans with. TCKR's caption prompts need a caption per shot: the shots are
  captioned here with ``data.caption``'s captioner, since half the candidates are holdout images the
  caption stage never saw (at ``data.image_size``; the caption stage reads the source's size, so a
  padded 28 px image may get another caption than its private original did).
* ``methods/<method>.py``: ``plan_context`` reads that table, ``plan_requests(0, M)`` plans the images,
  ``load_generator`` loads the foundation model with the merged bank (TCKR folds its LoRA in) and
  ``generate_batch`` samples batches of ``synthesis.batch_size``, as the synthesis actors do.

Seeds derive from the shadow's seed only (``adapt_seed``, ``generation_seed``): the shot choice, the
LoRA initialisation and noise, and every image's noise. The bank files live in a temporary directory
(safetensors) and are deleted. The replication gate's ``action: drop`` is not repeated: the shadow
Student sees every regenerated image. ``stages/privacy.py: train_shadow_regenerate`` runs this per
shadow; tests: ``tests/stages/test_shadow_generation.py``.
"""

from __future__ import annotations

import numpy as np

from synthset import storage
from synthset.config import Config


def adapt_seed(seed: int) -> int:
    """The shadow's ``adapt.seed`` (shots, LoRA init, training noise), derived from the shadow's seed."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0] % (2 ** 31))


def generation_seed(seed: int) -> int:
    """The shadow's generation run seed (image i's noise is ``derive_seed(generation_seed, i)``)."""
    return int(np.random.SeedSequence([seed, 3]).generate_state(1)[0] % (2 ** 31))


def adapt_on_half(cfg: Config, model_path: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                  seed: int, out_dir: str, device: str = "cpu") -> tuple[str, str]:
    """Train ``synthesis.method``'s LoRAs on (a seeded choice of shots from) ``images``; (bank path, table path).

    ``images``: uint8 (N, S, S[, C]) at ``data.image_size``; ``labels``: their classes; ``out_dir``: a local
    directory for ``loras.safetensors`` and ``loras.json``.
    """
    import os

    import torch

    from synthset.lora.bank import load_bank, merge_banks, save_bank
    from synthset.stages.adapt import (bank_inputs, bank_ranges, lora_table, method_lora, method_settings,
                                       select_shots, shot_prompts, train_bank)

    lora = method_lora(cfg)
    adapt = cfg.adapt.model_copy(update={"seed": adapt_seed(seed), "use_gpu": device == "cuda",
                                         "cpus_per_worker": max(1, torch.get_num_threads())})
    shots = select_shots(np.asarray(labels), len(class_names), adapt.shots_per_class, adapt.seed)
    shot_images, shot_labels = images[shots], np.asarray(labels)[shots].astype(np.int64)
    captions = None
    if lora.prompt == "caption":
        from synthset.models.captioners import caption_images, load_captioner

        cap = cfg.data.caption
        captioner = load_captioner(cap.captioner, device, None, cap.max_new_tokens, cap.prompt)
        captions = caption_images(captioner, shot_images, cap.batch_size)
    prompts = shot_prompts(cfg, class_names, shot_labels, captions)
    owner, num_loras = lora.owners(shot_labels)
    settings = method_settings(cfg)
    banks = []
    for b, (first, n) in enumerate(bank_ranges(num_loras, adapt.loras_per_bank)):
        uri = os.path.join(out_dir, f"bank-{b:04d}.safetensors")
        train_bank(model_path, *bank_inputs(shot_images, prompts, owner, first, n), first, n, settings,
                   adapt.model_dump(mode="json"), uri)
        banks.append(uri)
    loras, table = os.path.join(out_dir, "loras.safetensors"), os.path.join(out_dir, "loras.json")
    save_bank(loras, merge_banks([load_bank(u) for u in banks]), {"method": cfg.synthesis.method})
    storage.write_json(table, lora_table(cfg, class_names, settings, owner, num_loras, shot_labels, shots, shots,
                                         captions))
    return loras, table


def regenerate_synthetic_set(cfg: Config, model_path: str, images: np.ndarray, labels: np.ndarray,
                             class_names: list[str], seed: int, images_per_class: int, device: str = "cpu"):
    """Adapt ``synthesis.method``'s LoRAs on exactly (images, labels) and generate ``images_per_class`` per class.

    ``model_path``: the foundation pipeline the adapt stage starts from (``foundation_model_path``);
    ``images``: uint8 (N, S, S[, C]) at ``data.image_size`` (the shadow's half); ``seed``: the shadow's seed.
    Returns (images (M, C, S, S) in [-1, 1] at ``data.image_size`` with the channels of ``images``, classes
    (M,)), M = images_per_class × classes, planned exactly as the synthesis stage plans image 0 … M-1.
    """
    import tempfile

    import torch

    from synthset.data.shards import image_to_tensor
    from synthset.methods import get_method
    from synthset.stages.graph import STAGES

    method, syn = get_method(cfg.synthesis.method), cfg.synthesis
    if method.lora is None:
        raise ValueError(f"synthesis.method={syn.method!r} adapts no LoRAs: nothing to re-adapt on a half")
    channels = 1 if images.ndim == 3 else images.shape[-1]
    total = images_per_class * len(class_names)
    with tempfile.TemporaryDirectory(prefix="shadow-adapt-") as tmp:
        loras, table = adapt_on_half(cfg, model_path, images, labels, class_names, seed, tmp, device)
        context = method.plan_context(cfg, class_names, {"adapt": STAGES["adapt"].artifact(cfg, {"table": table})})
        generator = method.load_generator(model_path, loras, syn, device, None)
    requests = method.plan_requests(0, total, generation_seed(seed), context)
    x, y = [], []
    for i in range(0, total, syn.batch_size):
        chunk = requests[i:i + syn.batch_size]
        x += [image_to_tensor(im, cfg.data.image_size, channels) for im in method.generate_batch(generator, chunk, syn)]
        y += [r["class_id"] for r in chunk]
    return torch.stack(x), torch.tensor(y, dtype=torch.int64)
