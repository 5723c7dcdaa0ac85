"""DataDream: one LoRA per class over that class's k real shots, prompt "a photo of a {class}".

Each request uses its class's LoRA at weight 1 (LoFT's baseline table; DataDream trains rank
16, lr 1e-4). Batches mix classes freely: the fused-LoRA layer routes each sample.
"""

from __future__ import annotations

from synthset.methods import LoraAdaptation, Method, base_context, text_to_image
from synthset.methods.plan import class_for_index, derive_seed, image_key, loras_by_class

NAME = "datadream"


def plan_requests(start: int, stop: int, run_seed: int, context) -> list[dict]:
    names, rows = context.class_names, []
    for index in range(start, stop):
        c = class_for_index(index, len(names))
        ids = context.loras.get(c)
        if not ids:
            raise ValueError(f"datadream: no LoRA for class {names[c]!r}")
        rows.append({"key": image_key(index), "index": index, "method": NAME, "class_id": c,
                     "seed": derive_seed(run_seed, index),
                     "prompt": context.prompt_template.format(**{"class": names[c]}),
                     "lora_ids": [int(ids[0])], "lora_weights": [1.0]})
    return rows


def plan_context(cfg, class_names: list[str], artifacts: dict):
    return base_context(cfg, class_names, loras=loras_by_class(artifacts["adapt"]))


LORA = LoraAdaptation(per="class", rank=16, lr=1e-4, targets="attention")
METHOD = Method(NAME, needs=("loras",), lora=LORA, plan_requests=plan_requests, plan_context=plan_context,
                load_generator=text_to_image.loader(LORA), generate_batch=text_to_image.generate_batch)
