"""ClassPrompt: text-to-image generation with the prompt ``"a photo of a {class}"``.

The simplest method and the baseline of TCKR and LoFT: it needs nothing from the real data but
the class names. ``plan_requests`` turns an index range into request rows; the foundation
pipeline generates a batch of them (``methods.text_to_image``) with one seeded generator per
image, so an image depends only on its own request.
"""

from __future__ import annotations

from synthset.methods import Method, base_context, text_to_image
from synthset.methods.plan import class_for_index, derive_seed, image_key

NAME = "class_prompt"


def plan_requests(start: int, stop: int, run_seed: int, class_names: list[str], prompt_template: str) -> list[dict]:
    """Request rows for images ``start … stop-1`` (see DESIGN.md, "Generation request")."""
    rows = []
    for index in range(start, stop):
        c = class_for_index(index, len(class_names))
        rows.append({"key": image_key(index), "index": index, "method": NAME, "class_id": c,
                     "seed": derive_seed(run_seed, index),
                     "prompt": prompt_template.format(**{"class": class_names[c]})})
    return rows


def plan(start: int, stop: int, run_seed: int, context) -> list[dict]:
    return plan_requests(start, stop, run_seed, context.class_names, context.prompt_template)


def plan_context(cfg, class_names: list[str], artifacts: dict):
    return base_context(cfg, class_names)


METHOD = Method(NAME, plan_requests=plan, plan_context=plan_context,
                load_generator=text_to_image.loader(), generate_batch=text_to_image.generate_batch)
