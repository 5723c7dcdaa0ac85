"""What a config will produce and roughly cost, printed by every job's ``--dry-run``.

    python jobs/pipeline.py --config conf/prod/loft.yaml --dry-run

``project_run(cfg)`` works from the config alone (no model is loaded, no image is read): images =
``synthesis.images_per_class`` × classes, shards = ⌈images / ``synthesis.shard_size``⌉, and the
compute of adaptation and synthesis from *counted* FLOPs (``benchmarks/gpu_projection.py``, recorded in
``docs/benchmarks.md``) at an *assumed* GPU utilisation, or, for the embedded model, from its
measured CPU throughput. Every figure it prints says which assumption it rests on.

Classes are known without reading data for the built-in sources (10), from ``data.class_names``,
or from the class folders of an ``image_folder`` source whose ``data.path`` exists here (one
directory listing); otherwise the totals are left open and only per-image figures are given.
Captioning, Teacher, labelling, Student and evaluation compute is not projected.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from synthset.config import Config

# Counted with torch.utils.flop_counter on SD-2.1-base-shaped models (benchmarks/gpu_projection.py,
# docs/benchmarks.md "GPU-hours for 1M images with Stable Diffusion 2.1"): one UNet forward at 512 px
# (64×64 latents, batch 1) and one VAE decode of a 512 px image.
SD2_UNET_GFLOP_512 = 804.3
SD2_VAE_DECODE_GFLOP_512 = 2514.0
SD2_BLOCK_OUT_CHANNELS = [320, 640, 1280, 1280]
# A LoRA training sample: forward + backward through the frozen UNet, counted as 3 forwards (the
# usual 1 + 2; an upper bound, since frozen weights need no weight gradients). VAE encoding and the
# text encoder are not counted.
TRAIN_FORWARDS_PER_SAMPLE = 3
# The GPU assumption (not a measurement: no GPU has been timed yet, docs/benchmarks.md): an A100's
# dense bf16/fp16 peak (TF32 for float32) at 30 % model-FLOP utilisation, the middle of the table there.
GPU_NAME = "A100"
GPU_PEAK_TFLOPS = {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}
GPU_MFU = 0.30
# The embedded model's measured anchor (docs/benchmarks.md, "Synthesis pipeline efficiency"):
# conf/quickstart.yaml's architecture, 10 steps, guidance 1.75, batch 100, one actor on 2 CPU cores.
EMBEDDED_IMAGES_PER_S = 37.85
EMBEDDED_STEPS = 10
EMBEDDED_CPUS = 2
BUILTIN_CLASSES = {"fashion_mnist": 10, "digits": 10}


def count_classes(cfg: Config) -> tuple[int | None, str]:
    """(number of classes, where it came from) without reading any image; (None, why) when unknown."""
    data = cfg.data
    if data.source in BUILTIN_CLASSES:
        return BUILTIN_CLASSES[data.source], f"data.source={data.source}"
    if data.class_names:
        return len(data.class_names), "data.class_names"
    if data.source == "image_folder" and data.path and Path(data.path).expanduser().is_dir():
        from synthset.data.folder_source import ImageFolderSource

        try:
            return len(ImageFolderSource(data.path).class_names), f"class folders of {data.path}"
        except (ValueError, FileNotFoundError) as err:
            return None, str(err)
    return None, f"data.path {data.path!r} is not readable here" if data.path else f"data.source={data.source}"


def generator_kind(cfg: Config) -> tuple[str, str]:
    """("sd2" | "embedded" | "own" | "unknown", description) of the generator, from config files only.

    "own": the method trains its own diffusion model (CASD, RCDM) in its generator stage; the foundation
    model is not what synthesis runs.
    """
    from synthset.methods import get_method

    if "generator" in get_method(cfg.synthesis.method).needs:
        return "own", f"its own diffusion model, trained by the {cfg.synthesis.method} generator stage"
    path = cfg.foundation.path
    if path is None:
        return "embedded", "the embedded model pretrained by the foundation stage"
    unet_config = Path(path).expanduser() / "unet" / "config.json"
    if unet_config.is_file():
        blocks = json.loads(unet_config.read_text()).get("block_out_channels")
        if list(blocks or []) == SD2_BLOCK_OUT_CHANNELS:
            return "sd2", f"{path} (an SD 2.x-shaped UNet)"
        return "embedded", f"{path} (a small UNet, block_out_channels {blocks})"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).expanduser().exists():
        return "sd2", f"{path} (hub id; assumed SD 2.x-base-shaped, 865.9 M UNet parameters)"
    return "unknown", f"{path} (not found here)"


def _lora_count(cfg: Config, classes: int | None) -> int | None:
    """How many LoRAs the adapt stage trains (None: the method trains none, or classes are unknown)."""
    from synthset.methods import get_method

    lora = getattr(get_method(cfg.synthesis.method), "lora", None)
    if lora is None:
        return 0
    if lora.per == "dataset":
        return 1
    if classes is None:
        return None
    if lora.per == "class":
        return classes
    private = cfg.data.splits.private - cfg.data.splits.holdout
    shots = cfg.adapt.shots_per_class
    return private if shots is None else min(private, shots * classes)


def project_run(cfg: Config) -> dict:
    """Images, shards and the projected compute of ``cfg`` (see the module docstring)."""
    syn = cfg.synthesis
    classes, classes_from = count_classes(cfg)
    images = syn.images_per_class * classes if classes is not None else None
    out = {"method": syn.method, "classes": classes, "classes_from": classes_from,
           "images_per_class": syn.images_per_class, "images": images,
           "shards": math.ceil(images / syn.shard_size) if images is not None else None,
           "shard_size": syn.shard_size}
    kind, generator = generator_kind(cfg)
    out["generator"] = generator
    passes = 2 if syn.guidance_scale > 1 else 1  # classifier-free guidance runs the UNet on two inputs
    if kind == "sd2":
        resolution = syn.resolution or 512
        scale = (resolution / 512) ** 2  # convolutions scale with pixels; attention a little faster
        tflop_image = (syn.num_inference_steps * passes * SD2_UNET_GFLOP_512 + SD2_VAE_DECODE_GFLOP_512) * scale / 1e3
        effective = GPU_PEAK_TFLOPS[syn.dtype] * GPU_MFU
        out["tflop_per_image"] = round(tflop_image, 2)
        out["gpu_hours_per_million_images"] = round(1e6 * tflop_image / effective / 3600, 1)
        out["synthesis_gpu_hours"] = round(images * tflop_image / effective / 3600, 1) if images is not None else None
        loras = _lora_count(cfg, classes)
        out["loras"] = loras
        if loras:
            samples = cfg.adapt.steps * cfg.adapt.batch_per_lora * loras
            train_scale = (cfg.data.image_size / 512) ** 2
            tflop = samples * TRAIN_FORWARDS_PER_SAMPLE * SD2_UNET_GFLOP_512 * train_scale / 1e3
            out["adapt_gpu_hours"] = round(tflop / (GPU_PEAK_TFLOPS["bfloat16"] * GPU_MFU) / 3600, 1)
        elif loras == 0:
            out["adapt_gpu_hours"] = 0.0
        else:
            out["adapt_gpu_hours"] = None
        gpus = syn.actors.max * syn.actors.num_gpus
        out["synthesis_gpus"] = gpus
        if gpus and out["synthesis_gpu_hours"] is not None:
            out["synthesis_wall_hours"] = round(out["synthesis_gpu_hours"] / gpus, 1)
        out["assumption"] = (
            f"{GPU_NAME} {syn.dtype} dense peak {GPU_PEAK_TFLOPS[syn.dtype]:g} TFLOP/s at {GPU_MFU:.0%} model-FLOP "
            f"utilisation (assumed, not measured); FLOPs counted for SD 2.1-base: {SD2_UNET_GFLOP_512} GFLOP per UNet "
            f"forward and {SD2_VAE_DECODE_GFLOP_512:g} GFLOP per VAE decode at 512 px, scaled by pixel count "
            "(docs/benchmarks.md, benchmarks/gpu_projection.py); LoRA training counted as 3 UNet forwards per sample; "
            "captioning, Teacher, labels, Students and evaluation not included")
    elif kind == "embedded":
        per_s = EMBEDDED_IMAGES_PER_S * EMBEDDED_STEPS / syn.num_inference_steps
        out["cpu_images_per_s"] = round(per_s, 1)
        out["synthesis_cpu_hours"] = round(images / per_s / 3600, 2) if images is not None else None
        out["assumption"] = (
            f"embedded model on CPU: {EMBEDDED_IMAGES_PER_S} images/s measured for conf/quickstart.yaml's architecture "
            f"at {EMBEDDED_STEPS} steps on one {EMBEDDED_CPUS}-core actor (docs/benchmarks.md), scaled by "
            f"{EMBEDDED_STEPS}/{syn.num_inference_steps} steps; other architectures differ; no GPU needed")
    elif kind == "own":
        out["assumption"] = ("no projection: the method's own diffusion model has no measured throughput here "
                             f"({syn.num_inference_steps} sampler steps per image; docs/benchmarks.md has its training speed)")
    else:
        out["assumption"] = f"no projection: the foundation model {generator}"
    return out


def _n(value, unit: str = "") -> str:
    if value is None:
        return "unknown"
    return (f"{value:,}" if isinstance(value, int) else f"{value:,.1f}") + unit


def format_projection(p: dict) -> str:
    """The plan as the lines a dry run prints."""
    lines = ["", "=== plan (dry run: nothing was run) ===",
             f"method:      {p['method']}, generator {p['generator']}",
             f"classes:     {_n(p['classes'])} ({p['classes_from']})",
             f"images:      {_n(p['images'])} ({p['images_per_class']:,} per class)",
             f"shards:      {_n(p['shards'])} of {p['shard_size']:,} images"]
    if "synthesis_gpu_hours" in p:
        lines.append(f"synthesis:   {p['tflop_per_image']} TFLOP per image; expected GPU-hours "
                     f"{_n(p['synthesis_gpu_hours'])} ({p['gpu_hours_per_million_images']:,} per 1M images)"
                     + (f", about {_n(p['synthesis_wall_hours'])} h on {p['synthesis_gpus']:g} GPUs "
                        "(synthesis.actors.max × num_gpus)" if p.get("synthesis_wall_hours") is not None else ""))
        lines.append(f"adaptation:  {_n(p['loras'])} LoRA(s); expected GPU-hours {_n(p['adapt_gpu_hours'])}")
    elif "synthesis_cpu_hours" in p:
        lines.append(f"synthesis:   about {p['cpu_images_per_s']} images/s per 2-core actor; expected CPU time "
                     f"{_n(p['synthesis_cpu_hours'])} h for one actor; GPU-hours: none needed")
    lines.append(f"assumption:  {p['assumption']}")
    return "\n".join(lines)
