"""TCKR: CaptionPrompt through one LoRA adapted to the whole private set (seed 000, Sec. 3).

The LoRA (rank 4, UNet attention only) is trained with the prompts ``"{class}: {caption}"``
(stages/adapt.py); generation uses the same prompts, cycling the captions to reach the
requested cardinality (1× … 20× the real set), with the LoRA at weight 1.
"""

from __future__ import annotations

from synthset.methods.caption_prompt import caption_request

METHOD = "tckr"


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    rows = []
    for index in range(start, stop):
        r = caption_request(index, run_seed, context, METHOD)
        ids = context.loras.get(r["class_id"])
        if not ids:
            raise ValueError("tckr: the adaptation table has no LoRA")
        rows.append({**r, "lora_ids": [int(ids[0])], "lora_weights": [1.0]})
    return rows
