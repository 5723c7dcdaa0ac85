"""LoFT: fuse the per-image LoRAs of two real images of the same class (seed 003, Eq. 4).

h = W h + λ ΔW_i h + (1 − λ) ΔW_j h, with i ≠ j drawn uniformly among the class's per-image
LoRAs and λ fixed (``fusion.lam``; 0.5 is LoFT's best) or drawn from Beta(α, α)
(``fusion.beta_alpha``). ``fusion.mode = "triple"`` fuses three LoRAs with weights from a
symmetric Dirichlet(α) (equal thirds without α); ``"single"`` uses one LoRA at weight 1 (LoFT's
λ = 1). The pair and λ of image ``index`` come from a generator seeded by its own seed, so they
are planned, deterministic, and independent of batching and restarts.
"""

from __future__ import annotations

import numpy as np

from synthset.config import FusionConfig
from synthset.methods import LoraAdaptation, Method, base_context, text_to_image
from synthset.methods.plan import class_for_index, derive_seed, image_key, loras_by_class

NAME = "loft"
_FUSION_STREAM = 0x10F7  # separates the pair/λ draws from the initial-noise stream of the same seed
# LoRAs fused per image by each ``synthesis.fusion.mode``.
FUSION_ARITY = {"single": 1, "pair": 2, "triple": 3}


def fusion_weights(mode: str, rng: np.random.Generator, lam: float | None, beta_alpha: float | None) -> list[float]:
    if mode == "single":
        return [1.0]
    if mode == "pair":
        value = float(rng.beta(beta_alpha, beta_alpha)) if beta_alpha else float(lam)
        return [value, 1.0 - value]
    if mode == "triple":
        if beta_alpha:
            return [float(w) for w in rng.dirichlet([beta_alpha] * 3)]
        return [1 / 3] * 3
    raise ValueError(f"synthesis.fusion.mode: unknown mode {mode!r}")


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    names, fusion = context.class_names, context.fusion if context.fusion is not None else FusionConfig()
    mode = fusion.mode
    arity = FUSION_ARITY[mode]
    rows = []
    for index in range(start, stop):
        c = class_for_index(index, len(names))
        pool = context.loras.get(c, [])
        if len(pool) < arity:
            raise ValueError(f"loft: class {names[c]!r} has {len(pool)} per-image LoRAs; "
                             f"fusion.mode={mode!r} needs {arity}")
        seed = derive_seed(run_seed, index)
        rng = np.random.default_rng([seed, _FUSION_STREAM])
        picks = rng.choice(len(pool), size=arity, replace=False)
        weights = fusion_weights(mode, rng, fusion.lam, fusion.beta_alpha)
        rows.append({"key": image_key(index), "index": index, "method": NAME, "class_id": c, "seed": seed,
                     "prompt": context.prompt_template.format(**{"class": names[c]}),
                     "lora_ids": [int(pool[p]) for p in picks], "lora_weights": weights})
    return rows


def plan_context(cfg, class_names: list[str], artifacts: dict):
    """The per-image LoRAs of each class, from the adapt stage's table."""
    return base_context(cfg, class_names, loras=loras_by_class(artifacts["adapt"]))


def check(cfg, private_labels, class_names: list[str]) -> None:
    """Each image fuses ``FUSION_ARITY[mode]`` distinct LoRAs of its class: enough shots per class."""
    mode, k = cfg.synthesis.fusion.mode, cfg.adapt.shots_per_class
    if k is not None and k < FUSION_ARITY[mode]:
        raise ValueError(f"synthesis.fusion.mode={mode!r} fuses {FUSION_ARITY[mode]} LoRAs per image but "
                         f"adapt.shots_per_class={k}")


LORA = LoraAdaptation(per="image", rank=2, lr=1e-3, targets="attention")
METHOD = Method(NAME, needs=("loras",), reads=("synthesis.fusion",),
                lora=LORA, plan_requests=plan_requests, plan_context=plan_context, check=check,
                load_generator=text_to_image.loader(LORA), generate_batch=text_to_image.generate_batch)
