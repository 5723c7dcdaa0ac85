"""TCKR: CaptionPrompt through one LoRA adapted to the whole private set (seed 000, Sec. 3).

The LoRA (rank 4, UNet attention only) is trained with the prompts ``"{class}: {caption}"``
(stages/adapt.py); generation uses the same prompts, cycling the captions of the adapted images
to reach the requested cardinality (1× … 20× the real set), with the LoRA at weight 1 — folded
into the UNet once, since every image uses it.
"""

from __future__ import annotations

from synthset.methods import LoraAdaptation, Method, base_context, text_to_image
from synthset.methods.caption_prompt import caption_request
from synthset.methods.plan import shot_captions_by_class

NAME = "tckr"


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    rows = []
    for index in range(start, stop):
        r = caption_request(index, run_seed, context, NAME)
        ids = context.loras.get(r["class_id"])
        if not ids:
            raise ValueError("tckr: the adaptation table has no LoRA")
        rows.append({**r, "lora_ids": [int(ids[0])], "lora_weights": [1.0]})
    return rows


def plan_context(cfg, class_names: list[str], artifacts: dict):
    """The captions of the images the LoRA was adapted on, and the one dataset LoRA under every class."""
    return base_context(cfg, class_names, captions=shot_captions_by_class(artifacts["adapt"]),
                        loras={c: [0] for c in range(len(class_names))})


LORA = LoraAdaptation(per="dataset", rank=4, lr=1e-4, targets="attention", prompt="caption", fold_into_unet=True)
METHOD = Method(NAME, needs=("captions", "loras"), reads=("synthesis.caption_template",),
                lora=LORA, plan_requests=plan_requests, plan_context=plan_context,
                load_generator=text_to_image.loader(LORA), generate_batch=text_to_image.generate_batch)
