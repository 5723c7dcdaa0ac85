"""Generation methods: each turns an index range of the plan into request rows.

``plan_requests(method, start, stop, run_seed, context)`` dispatches to the method's module;
every module derives an image's class, seed and key from (run seed, index) only
(``methods.plan``), so every method shares resume, determinism and prefix semantics. Methods
with LoRAs put ``lora_ids``/``lora_weights`` on each request; ``lora.fused.fused_generate``
turns a batch of such requests into images in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_METHODS = ("tckr", "datadream", "loft")
CAPTION_METHODS = ("caption_prompt", "tckr")
METHODS = ("class_prompt", "caption_prompt", "tckr", "datadream", "loft")
# Methods whose every request uses LoRA 0 at weight 1 (TCKR's one dataset LoRA): synthesis folds
# it into the UNet's weights (``lora.bank.fold_lora_into_base``) instead of routing each sample.
SINGLE_LORA_METHODS = ("tckr",)


@dataclass(frozen=True)
class PlanContext:
    """What planning needs besides (run seed, index): names, prompts and the adaptation tables.

    captions: class id → [(private index, caption)], the captioned real images of that class.
    loras: class id → global LoRA ids of that class (DataDream: one; LoFT: one per real image;
    TCKR: the single dataset LoRA under every class).
    """

    class_names: list[str]
    prompt_template: str = "a photo of a {class}"
    caption_template: str = "{class}: {caption}"
    captions: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    loras: dict[int, list[int]] = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)


def plan_requests(method: str, start: int, stop: int, run_seed: int, context: PlanContext) -> list[dict]:
    from synthset.methods import caption_prompt, class_prompt, datadream, loft, tckr

    modules = {"class_prompt": class_prompt, "caption_prompt": caption_prompt, "tckr": tckr,
               "datadream": datadream, "loft": loft}
    if method not in modules:
        raise ValueError(f"synthesis.method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "class_prompt":
        return class_prompt.plan_requests(start, stop, run_seed, context.class_names, context.prompt_template)
    return modules[method].plan_requests(start, stop, run_seed, context)
