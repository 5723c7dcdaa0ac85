"""GPU-hours to generate 1M images with Stable Diffusion 2.1, from counted FLOPs.

    .venv/bin/python benchmarks/gpu_projection.py --images 1000000 --steps 25 --resolution 512

Counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention, 2 FLOPs per multiply-add) for one forward of an SD-2.1-shaped UNet2DConditionModel (random
weights, the published 2.1-base block layout), the SD VAE decoder at the same resolution and
the embedded model; with classifier-free guidance every step runs the UNet on two inputs.
The measured anchor is this machine: the embedded model's achieved FLOP/s while generating
(``generate_batch``, same code path as the synthesis actors). GPU figures are projections
at stated model-FLOP utilisations (MFU), not measurements; on a lent GPU, run with
``--measure-gpu`` to time the SD-2.1-shaped UNet and VAE decoder themselves (bf16, SDPA, batches 8 and 32)
and replace the assumption with measured images/s, GPU-hours and achieved TFLOP/s.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# Stable Diffusion 2.1 (base, 512 px) UNet and VAE layout, as in its published model configs.
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
PEAK_TFLOPS = {"A100 (bf16 dense, 312 TFLOP/s)": 312, "H100 SXM (bf16 dense, 989 TFLOP/s)": 989}


def count(fn, *models) -> int:
    """FLOPs of ``fn()``. Attention runs through the classic (bmm) processor while counting: the
    counter does not see the CPU kernel behind SDPA, which would drop the attention FLOPs."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for m in models:
        m.set_attn_processor(AttnProcessor())
    with FlopCounterMode(display=False) as counter:
        fn()
    for m in models:
        m.set_attn_processor(AttnProcessor2_0())
    return counter.get_total_flops()


@torch.no_grad()
def sd21_flops(resolution: int) -> tuple[int, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    latent = resolution // 8
    unet = UNet2DConditionModel(**{**SD21_UNET, "sample_size": latent}).eval()
    x, t, ctx = torch.randn(1, 4, latent, latent), torch.tensor([500]), torch.randn(1, 77, 1024)
    unet_flops = count(lambda: unet(x, t, encoder_hidden_states=ctx), unet)
    params = sum(p.numel() for p in unet.parameters())
    del unet
    vae = AutoencoderKL(**SD21_VAE).eval()
    vae_flops = count(lambda: vae.decode(torch.randn(1, 4, latent, latent)), vae)
    return unet_flops, vae_flops, params


@torch.no_grad()
def embedded_anchor(config: str, batch: int, steps: int, guidance: float) -> dict:
    """The embedded model's FLOPs per image and the FLOP/s this machine achieves generating."""
    from synthset.config import load_config
    from synthset.diffusion.text_to_image_sampler import generate_batch
    from synthset.methods.class_prompt import plan_requests
    from synthset.models.foundation import build_foundation

    cfg = load_config(config)
    pipe = build_foundation(cfg.foundation.arch, seed=0)
    names = [f"class{i}" for i in range(10)]
    requests = plan_requests(0, batch, 0, names, "a photo of a {class}")
    generate_batch(pipe, requests, steps, guidance)  # warm-up
    flops = count(lambda: generate_batch(pipe, requests, steps, guidance), pipe.unet, pipe.vae)
    t0 = time.perf_counter()
    generate_batch(pipe, requests, steps, guidance)
    seconds = time.perf_counter() - t0
    return {"flops_per_image": flops / batch, "images_per_s": batch / seconds, "achieved_tflops": flops / seconds / 1e12,
            "threads": torch.get_num_threads()}


def measure_gpu(resolution: int, batches: tuple[int, ...] = (8, 32)) -> dict:
    """SD-2.1-shaped UNet forwards/s and VAE decodes/s on this GPU in bf16 (SDPA attention, random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def rate(fn, n: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    latent = resolution // 8
    unet = UNet2DConditionModel(**{**SD21_UNET, "sample_size": latent}).to("cuda", torch.bfloat16).eval()
    vae = AutoencoderKL(**SD21_VAE).to("cuda", torch.bfloat16).eval()
    out = {"gpu": torch.cuda.get_device_name(), "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()})}
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 4, latent, latent, device="cuda", dtype=torch.bfloat16)
            ctx = torch.randn(batch, 77, 1024, device="cuda", dtype=torch.bfloat16)
            t = torch.full((batch,), 500, device="cuda")
            out[f"batch{batch}"] = {"unet_forwards_per_s": batch * rate(lambda: unet(x, t, encoder_hidden_states=ctx), 10),
                                    "vae_decodes_per_s": batch * rate(lambda: vae.decode(x), 3)}
    out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--no-guidance", action="store_true")
    parser.add_argument("--config", default="conf/quickstart.yaml", help="the embedded model used as the CPU anchor")
    parser.add_argument("--measure-gpu", action="store_true")
    args = parser.parse_args()
    cfg_passes = 1 if args.no_guidance else 2
    unet_f, vae_f, params = sd21_flops(args.resolution)
    per_image = args.steps * cfg_passes * unet_f + vae_f
    total = per_image * args.images
    anchor = embedded_anchor(args.config, 100, 10, 1.75)
    result = {"sd21_unet_params": params, "sd21_unet_gflops_per_forward": round(unet_f / 1e9, 1),
              "sd21_vae_decode_gflops": round(vae_f / 1e9, 1), "tflops_per_image": round(per_image / 1e12, 2),
              "total_exaflops": round(total / 1e18, 2), "cpu_anchor": anchor, "projection": {}}
    for gpu, peak in PEAK_TFLOPS.items():
        result["projection"][gpu] = {f"{int(mfu * 100)}% MFU": round(total / (peak * 1e12 * mfu) / 3600, 1)
                                     for mfu in (0.2, 0.3, 0.4)}
    if args.measure_gpu and torch.cuda.is_available():
        gpu = measure_gpu(args.resolution)
        for key, row in list(gpu.items()):
            if key.startswith("batch"):  # per image: steps × passes UNet forwards, then one VAE decode
                seconds = args.steps * cfg_passes / row["unet_forwards_per_s"] + 1 / row["vae_decodes_per_s"]
                row["images_per_s"] = round(1 / seconds, 2)
                row["hours_for_images"] = round(args.images * seconds / 3600, 1)
                row["achieved_tflops"] = round(per_image / seconds / 1e12, 1)
        result["measured_gpu"] = gpu
    print(json.dumps(result, indent=1))
    print(f"\n{args.images:,} images × {args.steps} steps × {cfg_passes} UNet passes at {args.resolution} px:"
          f" {per_image / 1e12:.1f} TFLOP/image, {total / 1e18:.1f} EFLOP in all")
    print("| GPU | 20% MFU | 30% MFU | 40% MFU |\n| --- | ---: | ---: | ---: |")
    for gpu, row in result["projection"].items():
        print(f"| {gpu} | " + " | ".join(f"{h:,} h" for h in row.values()) + " |")


if __name__ == "__main__":
    main()
