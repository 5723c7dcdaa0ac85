"""Foundation stage: pretrain the embedded text-to-image model on the public split (Ray Train).

With ``foundation.path`` set (SD 2.1 by hub id or a local directory) there is nothing to
pretrain: the stage only records which model later stages load. Otherwise one Ray Train worker
captions the public images with ``data.caption.captioner``, trains the VAE, then the UNet and
text encoder on prompts that are, per step and image, the class prompt ("a photo of a {class}")
or, with probability ``pretrain.caption_probability``, the caption prompt ("{class}: {caption}"),
with prompt dropout; so ClassPrompt, CaptionPrompt and TCKR prompts all mean something to it.
The public images carry ``data.public_shift`` (and only ``data.public_classes``), so the private
data is new to the model and adaptation has something to learn (``data/splits.py``). It saves the
pipeline with ``save_pretrained`` (safetensors) plus the public captions, loss curves and sample
grids (class prompts, and caption prompts of real public captions). Cached by the hash of
``data`` + ``foundation``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from synthset.config import Config
from synthset.stages.common import StageDir
from synthset.storage import local_path


def check_foundation_path(path: str) -> None:
    """``foundation.path``: a local directory must hold a diffusers pipeline; anything else is taken as a hub id."""
    if Path(path).expanduser().exists() or path.startswith(("/", ".", "~")):
        index = Path(path).expanduser() / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"foundation.path: {index} not found (expected a diffusers pipeline directory)")


def foundation_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "foundation")


def foundation_model_path(cfg: Config) -> str:
    """What ``load_foundation`` should load: the configured model, or the pretrained embedded one."""
    return cfg.foundation.path or local_path(foundation_dir(cfg).path("model"))


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _pretrain_loop(config: dict) -> None:
    """Runs inside the Ray Train worker."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    import ray.train
    from synthset.config import Config
    from synthset.data.splits import UnitImages, write_splits
    from synthset.diffusion.text_to_image import encode_latents, train_unet, train_vae
    from synthset.plots import save_class_grid, save_curves
    from synthset.diffusion.text_to_image import caption_prompts
    from synthset.diffusion.text_to_image_sampler import generate_batch
    from synthset.methods.class_prompt import plan_requests
    from synthset.models.captioners import caption_images, load_captioner
    from synthset.models.foundation import build_foundation
    from synthset.stages.caption import write_captions

    cfg = Config.model_validate(config["cfg"])
    out = config["out"]
    pre, arch = cfg.foundation.pretrain, cfg.foundation.arch
    torch.set_num_threads(pre.num_cpus)
    device = "cuda" if pre.use_gpu and torch.cuda.is_available() else "cpu"
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    write_splits(splits, os.path.join(out, "splits.json"))  # which public images it saw
    public = splits.public
    if len(public) == 0:
        raise ValueError("data.splits.public is 0: the embedded foundation model needs public images to pretrain on")
    cap = cfg.data.caption
    t0 = time.time()
    captioner = load_captioner(cap.captioner, device, _dtype(cap.dtype) if device == "cuda" else None,
                               cap.max_new_tokens, cap.prompt)
    captions = caption_images(captioner, public.read(), cap.batch_size)  # of the (shifted) images it trains on
    del captioner
    write_captions(os.path.join(out, "public_captions.jsonl"), public, splits.public_index, captions)
    caption_seconds = time.time() - t0
    # The embedded foundation draws its batches by index from the public split, held as uint8 (converted a
    # batch at a time): the one stage that keeps a split, the embedded model's public pretraining set.
    public_images = public.read(size=arch.image_size)
    x = UnitImages(public_images, device)
    vae_x = x
    if pre.vae_unshifted and splits.public_shift != "none":
        vae_x = UnitImages(np.concatenate([public_images, splits.public_unshifted.read(size=arch.image_size)]), device)
    pipe = build_foundation(arch, seed=pre.seed).to(device)
    t0 = time.time()
    vae_losses = train_vae(pipe.vae, vae_x, pre.vae_steps, pre.vae_batch_size, pre.vae_lr, pre.vae_kl_weight, pre.seed)
    del vae_x
    latents = encode_latents(pipe.vae, x)
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        recon = pipe.vae.decode(latents[:512]).sample
        recon_mse = float(F.mse_loss(recon, x[:512]))
    vae_seconds = time.time() - t0
    prompts = [pre.prompt_template.format(**{"class": public.class_names[c]}) for c in public.labels]
    captioned = caption_prompts(public.labels, public.class_names, captions, pre.caption_template)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    t0 = time.time()
    unet_losses = train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, noise_scheduler, latents * scaling,
                             prompts, pre.unet_steps, pre.batch_size, pre.lr, pre.prompt_dropout, pre.seed + 1,
                             min_snr_gamma=pre.min_snr_gamma, ema_decay=pre.ema_decay,
                             captioned_prompts=captioned, caption_probability=pre.caption_probability)
    unet_seconds = time.time() - t0
    pipe.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    save_curves({"vae": vae_losses}, os.path.join(out, "vae_loss.png"), "VAE loss")
    save_curves({"unet": unet_losses}, os.path.join(out, "unet_loss.png"), "UNet denoising loss")
    names = public.class_names
    requests = plan_requests(0, 10 * len(names), 12345, names, pre.prompt_template)
    images = generate_batch(pipe, requests, cfg.synthesis.num_inference_steps, cfg.synthesis.guidance_scale)
    save_class_grid(images, np.array([r["class_id"] for r in requests]), names, os.path.join(out, "samples.png"))
    # The same requests prompted with real public captions of their class ("{class}: {caption}").
    by_class = {c: [captioned[i] for i in np.flatnonzero(public.labels == c)[:10]] for c in range(len(names))}
    requests = [{**r, "prompt": by_class[r["class_id"]][(r["index"] // len(names)) % len(by_class[r["class_id"]])]}
                for r in requests if by_class[r["class_id"]]]
    images = generate_batch(pipe, requests, cfg.synthesis.num_inference_steps, cfg.synthesis.guidance_scale)
    save_class_grid(images, np.array([r["class_id"] for r in requests]), names,
                    os.path.join(out, "caption_samples.png"))
    metrics = {"vae_recon_mse": recon_mse, "vae_seconds": vae_seconds, "unet_seconds": unet_seconds,
               "vae_final_loss": float(np.mean(vae_losses[-20:])), "unet_final_loss": float(np.mean(unet_losses[-50:])),
               "scaling_factor": scaling, "public_images": len(public), "caption_seconds": caption_seconds,
               "public_distinct_captions": len(set(captions)), "public_shift": splits.public_shift,
               "public_classes": sorted({names[c] for c in np.unique(public.labels)}, key=names.index)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run_foundation(cfg: Config, tracker=None) -> dict:
    """Pretrain (or reuse) the foundation model; returns the stage summary."""
    stage = foundation_dir(cfg)
    if cfg.foundation.path is not None:
        return {"stage": "foundation", "model": cfg.foundation.path, "pretrained": False}
    if stage.is_complete():
        return stage.reuse(f"cached model {stage.path('model')}")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage.begin(cfg)
    out = local_path(stage.uri)
    pre = cfg.foundation.pretrain
    print(f"[foundation] pretraining on {cfg.data.splits.public} public images (shift {cfg.data.public_shift!r}, "
          f"captions by {cfg.data.caption.captioner!r}, caption prompts {pre.caption_probability:.0%}): "
          f"{pre.vae_steps} VAE steps, {pre.unet_steps} UNet steps → {out}")
    t0 = time.time()
    trainer = TorchTrainer(
        _pretrain_loop,
        train_loop_config={"cfg": cfg.to_dict(), "out": out},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=pre.use_gpu,
                                     resources_per_worker={"CPU": pre.num_cpus}),
        run_config=RunConfig(name=f"foundation-{stage.hash}", storage_path=os.path.join(out, "_ray")),
    )
    trainer.fit()
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    summary = stage.complete({"model": os.path.join(out, "model"), "seconds": time.time() - t0, **metrics})
    if tracker is not None:
        tracker.log_stage("foundation", cfg, metrics={k: v for k, v in metrics.items()},
                          artifacts=[os.path.join(out, n) for n in ("samples.png", "caption_samples.png",
                                                                    "vae_loss.png", "unet_loss.png")])
    return summary
