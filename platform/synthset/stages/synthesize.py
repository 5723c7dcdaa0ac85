"""Synthesis and labelling stages: Ray Data actor pools whose unit of work is one shard.

The plan (``methods.plan.shard_ranges``) cuts the requested images into fixed-size shards. Each
pending shard becomes one row of a Ray Dataset; a pool of actors
(``compute=ActorPoolStrategy(min, max)``, ``num_gpus`` per actor from the config) loads the model
once, generates the shard's images in batches, writes the shard atomically and returns its stats.
The driver only sees small stats rows, reports progress, and writes ``manifest.json`` last.
A rerun skips complete shards; a complete dataset is skipped outright.
"""

from __future__ import annotations

import time

import numpy as np

from synthset import storage
from synthset.config import Config
from synthset.data.shards import completed_shards, iter_shard, read_manifest, shard_name, write_manifest, write_shard
from synthset.methods.plan import shard_ranges
from synthset.stages.common import StageDir
from synthset.stages.shard_pool import PoolResources, process_stats, run_shard_pool, torch_setup


def synthesis_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "synthesis")


def label_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "label")


def _encode_all(images: np.ndarray, fmt: str) -> list[bytes]:
    from synthset.data.shards import encode_image

    return [encode_image(image, fmt) for image in images]


class ShardGenerator:
    """Shard-pool worker: loads the method's generator once, then generates and writes one shard per call.

    The method (``methods/<synthesis.method>.py``) plans each shard's requests, loads its generator
    (for the text-to-image methods: the foundation pipeline with the adapted LoRAs) and generates
    each batch.

    Images are encoded (PNG/JPEG) on a background thread while the model generates the next
    batch, so encoding stays off the model's critical path (it matters at 512 px on a GPU).
    """

    def __init__(self, model_path: str, synthesis, method, class_names: list[str], run_seed: int,
                 dataset: str, generator_id: str, context=None, loras: str | None = None):
        """``synthesis``: the ``SynthesisConfig``; ``method``: the ``Method`` itself; ``context``: its
        ``PlanContext`` (None: names, templates and fusion settings only)."""
        from concurrent.futures import ThreadPoolExecutor

        from synthset.methods import PlanContext

        self.cfg, self.method = synthesis, method
        device, dtype = torch_setup(self.cfg.actors.num_cpus, self.cfg.actors.num_gpus, self.cfg.dtype)
        # Half precision only on GPU; on CPU it is slower (bf16) or unsupported (fp16).
        self.generator = self.method.load_generator(model_path, loras, self.cfg, device,
                                                    dtype if device == "cuda" else None)
        self.class_names, self.run_seed, self.dataset, self.generator_id = class_names, run_seed, dataset, generator_id
        self.context = context if context is not None else PlanContext(
            class_names, synthesis.prompt_template, synthesis.caption_template, fusion=synthesis.fusion)
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")

    def __call__(self, task: dict) -> dict:
        t0 = time.time()
        requests = self.method.plan_requests(int(task["start"]), int(task["stop"]), self.run_seed, self.context)
        encoded, model_seconds = [], 0.0
        for i in range(0, len(requests), self.cfg.batch_size):
            chunk = requests[i:i + self.cfg.batch_size]
            t = time.time()
            images = self.method.generate_batch(self.generator, chunk, self.cfg)
            model_seconds += time.time() - t
            encoded.append((chunk, self.encoder.submit(_encode_all, images, self.cfg.image_format)))
        samples = []
        for chunk, future in encoded:
            for r, image_bytes in zip(chunk, future.result()):
                meta = {**r, "generator": self.generator_id, "guidance_scale": self.cfg.guidance_scale,
                        "num_inference_steps": self.cfg.num_inference_steps}
                samples.append({"key": r["key"], "image_bytes": image_bytes, "cls": r["class_id"], "meta": meta})
        return write_shard(self.dataset, int(task["shard"]), samples, self.cfg.image_format,
                           {"seconds": time.time() - t0, "model_seconds": model_seconds, **process_stats()})


def _pending(dataset: str, ranges: list[tuple[int, int, int]], resume: bool) -> tuple[list[dict], dict[int, dict]]:
    if not resume:
        storage.delete_dir_contents(dataset)
    done = completed_shards(dataset) if resume else {}
    done = {i: s for i, s in done.items() if i < len(ranges) and s["count"] == ranges[i][2] - ranges[i][1]}
    tasks = [{"shard": i, "start": a, "stop": b} for i, a, b in ranges if i not in done]
    return tasks, done


def run_synthesis(cfg: Config, model_path: str, class_names: list[str], resume: bool = True, tracker=None,
                  context=None, loras: str | None = None, method=None) -> dict:
    """Generate the planned images into ``<synthesis dir>/data`` and return the stage summary.

    ``context``: the method's ``PlanContext`` (captions, LoRA table; ClassPrompt needs none);
    ``loras``: the adapted LoRA bank (``stages.adapt``) of a method that needs LoRAs; ``method``: the
    ``Method`` (None: the registered ``synthesis.method``).
    """
    from synthset.methods import get_method

    stage = synthesis_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("data"))
    syn = cfg.synthesis
    method = method if method is not None else get_method(syn.method)
    if ("loras" in method.needs) != bool(loras):
        raise ValueError(f"synthesis.method={syn.method!r} " + ("needs the adapted LoRAs (run the adapt stage first)"
                                                                 if loras else "takes no LoRAs"))
    total = syn.images_per_class * len(class_names)
    dataset = stage.path("data")
    ranges = shard_ranges(total, syn.shard_size)
    stage.begin(cfg)
    tasks, done = _pending(dataset, ranges, resume)
    print(f"[synthesis] {total} images ({syn.method}, {syn.num_inference_steps} steps, guidance {syn.guidance_scale}) "
          f"in {len(ranges)} shards; {len(done)} already complete; actors {syn.actors.min}..{syn.actors.max} "
          f"× {syn.actors.num_gpus} GPU")
    t0 = started = time.time()
    new = run_shard_pool(
        tasks, ShardGenerator,
        {"model_path": model_path, "synthesis": syn, "method": method, "class_names": class_names,
         "run_seed": cfg.run.seed, "dataset": dataset, "generator_id": model_path, "context": context, "loras": loras},
        PoolResources.of(syn.actors), "synthesis", total, sum(s["count"] for s in done.values()), tracker)
    seconds = time.time() - t0
    stats = list(done.values()) + new
    generated = sum(s["count"] for s in new)
    manifest = write_manifest(dataset, {"config_hash": stage.hash, "class_names": class_names, "method": syn.method,
                                        "generator": model_path, "run_seed": cfg.run.seed, "loras": loras,
                                        "plan": {"total": total, "shard_size": syn.shard_size}}, stats)
    if manifest["num_samples"] != total:
        raise RuntimeError(f"synthesis: {manifest['num_samples']} samples written, {total} planned")
    summary = stage.complete({"dataset": dataset, "num_samples": total, "generated_now": generated,
                              "seconds": seconds, "images_per_s": generated / seconds if seconds > 0 else 0.0,
                              "driver_peak_rss_mb": process_stats()["peak_rss_mb"],
                              "actor_peak_rss_mb": max((s.get("peak_rss_mb", 0.0) for s in new), default=0.0),
                              "actors_used": len({s.get("pid") for s in new}),
                              # before the first shard: the actor's process and Ray Data (start), its model (init)
                              "actor_start_seconds": min((s["actor_started_at"] - started for s in new
                                                          if "actor_started_at" in s), default=0.0),
                              "actor_init_seconds": max((s.get("actor_init_seconds", 0.0) for s in new),
                                                        default=0.0)})
    print(f"[synthesis] {generated} images generated in {seconds:.0f}s "
          f"({summary['images_per_s']:.1f} images/s) → {dataset}")
    return summary


class ShardLabeller:
    """Shard-pool worker: adds Teacher probabilities (``<key>.soft.npy``) to each sample of one shard per call.

    The image members are copied byte for byte (PNG or JPEG, as generated); the images are decoded only
    to be classified, ``batch_size`` at a time.
    """

    def __init__(self, teacher_path: str, source: str, dataset: str, batch_size: int, num_cpus: float, num_gpus: float,
                 image_size: int):
        from synthset.models.classifiers import classifier_channels, load_classifier

        device, _ = torch_setup(num_cpus, num_gpus)
        self.model = load_classifier(storage.materialize(teacher_path), device)
        self.channels = classifier_channels(storage.materialize(teacher_path))  # what the Teacher reads
        self.source, self.dataset, self.batch_size, self.image_size = source, dataset, batch_size, image_size

    def __call__(self, task: dict) -> dict:
        import torch

        from synthset.data.shards import decode_image, image_to_tensor
        from synthset.models.training import predict_proba

        t0 = time.time()
        path = storage.join(self.source, shard_name(int(task["shard"])))
        samples = list(iter_shard(path, decode=False))
        probs = []
        for i in range(0, len(samples), self.batch_size):
            x = torch.stack([image_to_tensor(decode_image(s["image"], f"{path}:{s['key']}"), self.image_size,
                                             self.channels) for s in samples[i:i + self.batch_size]])
            probs.append(predict_proba(self.model, x, self.batch_size))
        agree: dict[str, int] = {}
        image_format = "png"
        for s, p in zip(samples, np.concatenate(probs) if probs else []):
            s["soft"] = p
            s["image_bytes"], image_format = s.pop("image"), s.pop("image_ext")
            agree[str(s["cls"])] = agree.get(str(s["cls"]), 0) + int(p.argmax() == s["cls"])
        return write_shard(self.dataset, int(task["shard"]), samples, image_format,
                           {"seconds": time.time() - t0, "teacher_agrees": agree, **process_stats()})


def run_label(cfg: Config, source: str, teacher_path: str, resume: bool = True, tracker=None) -> dict:
    """Write a labelled copy of the synthetic dataset ``source`` with Teacher soft labels."""
    stage = label_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("data"))
    src = read_manifest(source)
    dataset = stage.path("data")
    stage.begin(cfg)
    ranges = [(i, 0, s["count"]) for i, s in enumerate(src["shards"])]
    tasks, done = _pending(dataset, ranges, resume)
    t0 = time.time()
    acts = cfg.label.actors
    new = run_shard_pool(tasks, ShardLabeller,
                         {"teacher_path": teacher_path, "source": source, "dataset": dataset,
                          "batch_size": cfg.label.batch_size, "num_cpus": acts.num_cpus, "num_gpus": acts.num_gpus,
                          "image_size": cfg.data.image_size},
                         PoolResources.of(acts), "label", src["num_samples"], sum(s["count"] for s in done.values()),
                         tracker)
    stats = list(done.values()) + new
    names = src["class_names"]
    agree = {c: sum(s["teacher_agrees"].get(str(c), 0) for s in stats) for c in range(len(names))}
    totals = {c: sum(s["per_class"].get(str(c), 0) for s in stats) for c in range(len(names))}
    per_class = {names[c]: agree[c] / totals[c] for c in range(len(names)) if totals[c]}
    agreement = sum(agree.values()) / max(1, sum(totals.values()))
    manifest = write_manifest(dataset, {"config_hash": stage.hash, "class_names": names,
                                        "method": src["method"], "generator": src["generator"],
                                        "teacher": teacher_path, "source": source,
                                        "teacher_agreement": agreement, "teacher_agreement_per_class": per_class},
                              stats)
    summary = stage.complete({"dataset": dataset, "num_samples": manifest["num_samples"],
                              "teacher_agreement": agreement, "teacher_agreement_per_class": per_class,
                              "seconds": time.time() - t0})
    print(f"[label] Teacher labels {agreement:.1%} of {manifest['num_samples']} synthetic images as their prompted class")
    return summary


def dataset_sample_grid(dataset: str, path: str, per_class: int = 10) -> None:
    """A per-class grid from the first shard(s) of ``dataset``."""
    from synthset.plots import save_class_grid

    manifest = read_manifest(dataset)
    names = manifest["class_names"]
    images, labels = [], []
    for shard in manifest["shards"]:
        for s in iter_shard(storage.join(dataset, shard["shard"])):
            images.append(s["image"])
            labels.append(s["cls"])
        if all(np.sum(np.array(labels) == c) >= per_class for c in range(len(names))):
            break
    save_class_grid(np.stack(images), np.array(labels), names, path, per_class)
