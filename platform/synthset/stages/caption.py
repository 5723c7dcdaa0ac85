"""Caption stage: one caption per image of a split (private by default), by a Ray Data actor pool.

The split is cut into parts of ``data.caption.part_size`` images; each pending part is one row of
a Ray Dataset, and a pool of actors (``ActorPoolStrategy(min, max)``, ``num_gpus`` per actor from
``data.caption.actors``) loads the captioner once (``load_captioner``: BLIP-2 in bf16 on GPU in
production, the embedded ``properties`` captioner otherwise), captions the part in batches and
writes ``parts/part-NNNNNN.jsonl`` atomically. The driver then writes ``captions.jsonl`` (one
``{"position", "index", "class_id", "caption"}`` per image, in split order) and ``_SUCCESS.json``.
A rerun skips complete parts; a complete stage is skipped outright.

Output: ``<output.root>/caption-<split>/<hash>/captions.jsonl``; ``read_captions`` loads it.
"""

from __future__ import annotations

import json
import time

import numpy as np

from synthset import storage
from synthset.config import Config, DataConfig, config_hash
from synthset.methods.plan import shard_ranges
from synthset.stages.common import StageDir, output_root
from synthset.stages.shard_pool import PoolResources, run_shard_pool, torch_setup

SPLITS = ("private", "public")


def caption_dir(cfg: Config, split: str = "private") -> StageDir:
    """The stage directory, keyed by what the captions depend on: the split's images and the captioner.

    How the work is spread (``data.caption.actors``) is left out; so is the public split's shift
    and class subset when captioning the private split, which they do not change.
    """
    if split not in SPLITS:
        raise ValueError(f"caption split must be one of {SPLITS}, got {split!r}")
    data = cfg.data.model_dump(mode="json")
    for name in ("follow_links_outside", "max_image_pixels"):  # added later: at their defaults, the old hashes
        if data[name] == DataConfig.model_fields[name].default:
            data.pop(name)
    caption = data.pop("caption")
    caption.pop("actors")
    if split == "private":
        data.pop("public_shift")
        data.pop("public_classes")
    h = config_hash({"stage": "caption", "split": split, "data": data, "caption": caption})
    return StageDir("caption", h, storage.join(output_root(cfg), f"caption-{split}", h))


def _part_name(part: int) -> str:
    return f"part-{part:06d}.jsonl"


def caption_rows(images, index: np.ndarray, captions: list[str], start: int = 0) -> list[dict]:
    """The JSON rows of ``captions`` for split positions ``start …`` (``images``: the split, for its labels)."""
    return [{"position": start + i, "index": int(index[start + i]), "class_id": int(images.labels[start + i]),
             "caption": c} for i, c in enumerate(captions)]


def write_captions(path: str, images, index: np.ndarray, captions: list[str]) -> None:
    """Write ``captions.jsonl`` for a whole split (``images``: the split, for its labels; ``index``: source indices)."""
    rows = caption_rows(images, index, captions)
    storage.write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_captions(path: str) -> list[str]:
    """The captions of ``captions.jsonl`` in split order (``captions[i]`` is image ``i`` of the split)."""
    rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line]
    if [r["position"] for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: positions are not 0..{len(rows) - 1} in order")
    return [r["caption"] for r in rows]


def captions_by_class(cfg: Config, path: str) -> dict[int, list[tuple[int, str]]]:
    """Class id → [(private position, caption)] of every image of the private captions ``path``."""
    from synthset.stages.prepare import load_splits

    labels = load_splits(cfg).private.labels
    by_class: dict[int, list[tuple[int, str]]] = {}
    for pos, text in enumerate(read_captions(path)):
        by_class.setdefault(int(labels[pos]), []).append((pos, text))
    return by_class


def _split_images(cfg: Config, split: str):
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    if split == "private":
        return splits.private, splits.private_index
    return splits.public, splits.public_index


class PartCaptioner:
    """Shard-pool worker: loads the captioner once, then captions one part (``{part, start, stop}``) of the
    split per call, reading just those images from the prepared shards, and writes the part's file."""

    def __init__(self, cfg: dict, split: str, parts_dir: str):
        from synthset.models.captioners import load_captioner

        cfg = Config.model_validate(cfg)
        self.cap = cfg.data.caption
        device, dtype = torch_setup(self.cap.actors.num_cpus, self.cap.actors.num_gpus, self.cap.dtype)
        # Half precision only on GPU (bf16 is BLIP-2's production setting); float32 on CPU.
        self.captioner = load_captioner(self.cap.captioner, device, dtype if device == "cuda" else None,
                                        self.cap.max_new_tokens, self.cap.prompt)
        self.images, self.index = _split_images(cfg, split)
        self.parts_dir = parts_dir

    def __call__(self, task: dict) -> dict:
        from synthset.models.captioners import caption_images

        t0 = time.time()
        start, stop = int(task["start"]), int(task["stop"])
        captions = caption_images(self.captioner, self.images.read(np.arange(start, stop)), self.cap.batch_size)
        rows = caption_rows(self.images, self.index, captions, start)
        storage.write_bytes(storage.join(self.parts_dir, _part_name(int(task["part"]))),
                            "".join(json.dumps(r) + "\n" for r in rows).encode())
        return {"part": int(task["part"]), "count": len(rows), "seconds": time.time() - t0}


def _complete_parts(parts_dir: str, ranges: list[tuple[int, int, int]]) -> set[int]:
    done = set()
    for part, start, stop in ranges:
        path = storage.join(parts_dir, _part_name(part))
        if storage.exists(path) and storage.read_bytes(path).count(b"\n") == stop - start:
            done.add(part)
    return done


def run_caption(cfg: Config, split: str = "private", resume: bool = True, tracker=None) -> dict:
    """Caption every image of ``split`` into ``<caption dir>/captions.jsonl``; returns the stage summary.

    Needs Ray (``stages.common.init_ray``). Bad input fails before any work: the captioner is
    resolved (an unknown local path raises ``FileNotFoundError`` naming ``data.caption.captioner``).
    """
    from synthset.models.captioners import check_captioner

    stage = caption_dir(cfg, split)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("captions.jsonl"))
    cap = cfg.data.caption
    check_captioner(cap.captioner)
    images, index = _split_images(cfg, split)
    parts_dir = stage.path("parts")
    stage.begin(cfg)
    if not resume:
        storage.delete_dir_contents(parts_dir)
    ranges = shard_ranges(len(images), cap.part_size)
    done = _complete_parts(parts_dir, ranges)
    tasks = [{"part": p, "start": a, "stop": b} for p, a, b in ranges if p not in done]
    print(f"[caption] {len(images)} {split} images with {cap.captioner!r} in {len(ranges)} parts; "
          f"{len(done)} already complete; actors {cap.actors.min}..{cap.actors.max} × {cap.actors.num_gpus} GPU")
    t0 = time.time()
    stats = run_shard_pool(tasks, PartCaptioner, {"cfg": cfg.to_dict(), "split": split, "parts_dir": parts_dir},
                           PoolResources.of(cap.actors), "caption", len(images),
                           sum(b - a for p, a, b in ranges if p in done), tracker)
    seconds = time.time() - t0
    lines = b"".join(storage.read_bytes(storage.join(parts_dir, _part_name(p))) for p, _, _ in ranges)
    storage.write_bytes(stage.path("captions.jsonl"), lines)
    captions = read_captions(stage.path("captions.jsonl"))
    if len(captions) != len(images):
        raise RuntimeError(f"caption: {len(captions)} captions written for {len(images)} images")
    captioned_now = sum(s["count"] for s in stats)
    summary = stage.complete({"captions": stage.path("captions.jsonl"), "split": split, "captioner": cap.captioner,
                              "num_captions": len(captions), "distinct_captions": len(set(captions)),
                              "captioned_now": captioned_now, "seconds": seconds,
                              "images_per_s": captioned_now / seconds if seconds > 0 else 0.0})
    print(f"[caption] {captioned_now} captions in {seconds:.0f}s ({len(set(captions))} distinct) "
          f"→ {summary['captions']}")
    return summary
