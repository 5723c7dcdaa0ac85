"""Deterministic request planning shared by every method.

Image ``index`` gets ``seed = derive_seed(run_seed, index)`` and ``key = f"{index:010d}"``:
neither depends on cluster size, batch size or restarts, and any prefix ``range(0, n)`` of a
plan is itself a valid, class-balanced smaller plan (cardinality sweeps reuse one plan).
"""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, index: int) -> int:
    """A 63-bit seed from (run seed, image index), independent across indices."""
    digest = hashlib.sha256(f"synthset:{run_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_key(index: int) -> str:
    return f"{index:010d}"


def class_for_index(index: int, num_classes: int) -> int:
    """Classes interleave (0, 1, …, C-1, 0, …) so every prefix is balanced."""
    return index % num_classes


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) covering ``range(total)`` in fixed-size shards."""
    return [(i, start, min(start + shard_size, total))
            for i, start in enumerate(range(0, total, shard_size))]


# The adapt stage's LoRA table (``stages/adapt.py::lora_table``), read for planning.
def loras_by_class(table: dict) -> dict[int, list[int]]:
    """Class id → the ids of that class's LoRAs (DataDream: one; LoFT: one per real image)."""
    loras: dict[int, list[int]] = {}
    for lora in table["loras"]:
        loras.setdefault(lora["class_id"], []).append(lora["id"])
    return loras


def shot_captions_by_class(table: dict) -> dict[int, list[tuple[int, str]]]:
    """Class id → [(private position, caption)] of the images the LoRAs were adapted on (TCKR)."""
    captions: dict[int, list[tuple[int, str]]] = {}
    for shot in table["shots"]:
        captions.setdefault(shot["class_id"], []).append((shot["private_position"], shot["caption"]))
    return captions
