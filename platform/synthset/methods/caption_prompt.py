"""CaptionPrompt: text-to-image with the prompt ``"{class}: {caption}"`` of a real image.

The q-th request of class c (``index = q·C + c``) takes the caption of the (q mod n_c)-th
captioned real image of that class, so a dataset of m× the real set cycles the captions m times
(TCKR, Sec. 3: "we cycle through the captions to reach the requested cardinality"). It needs the
captions of the private split (the caption stage) and reads ``synthesis.caption_template``.
"""

from __future__ import annotations

from synthset.methods import Method, base_context, text_to_image
from synthset.methods.plan import class_for_index, derive_seed, image_key

NAME = "caption_prompt"


def caption_request(index: int, run_seed: int, context, method: str = NAME) -> dict:
    names = context.class_names
    c = class_for_index(index, len(names))
    pool = context.captions.get(c)
    if not pool:
        raise ValueError(f"{method}: no captioned real image of class {names[c]!r}")
    real_index, caption = pool[(index // len(names)) % len(pool)]
    return {"key": image_key(index), "index": index, "method": method, "class_id": c,
            "seed": derive_seed(run_seed, index), "real_index": int(real_index), "caption": caption,
            "prompt": context.caption_template.format(**{"class": names[c], "caption": caption})}


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    return [caption_request(index, run_seed, context) for index in range(start, stop)]


def plan_context(cfg, class_names: list[str], artifacts: dict):
    """Every captioned private image, by class (``artifacts["caption"]``: what the caption stage's artifact reads as)."""
    return base_context(cfg, class_names, captions=artifacts["caption"])


METHOD = Method(NAME, needs=("captions",), reads=("synthesis.caption_template",),
                plan_requests=plan_requests, plan_context=plan_context,
                load_generator=text_to_image.loader(), generate_batch=text_to_image.generate_batch)
