"""Training and sampling speed of the embedded foundation model for a config, on this machine.

    .venv/bin/python benchmarks/foundation_speed.py --config conf/quickstart.yaml [--threads 2]

Prints VAE and UNet training steps/s (batch sizes from the config, fwd+bwd+AdamW), UNet
forward image-steps/s, and end-to-end images/s of ``generate_batch`` (guidance doubles the
UNet work) — the numbers behind the design choice recorded in docs/results.md.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402

from synthset.config import load_config  # noqa: E402
from synthset.diffusion.text_to_image_sampler import generate_batch  # noqa: E402
from synthset.methods.class_prompt import plan_requests  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402


def timed(fn, repeats: int, autocast: bool = False) -> float:
    def call():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
            fn()

    call()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="bf16: every timed call under torch.autocast(bfloat16) on this device (CPUs with AVX512-BF16/AMX)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    bf16 = args.autocast == "bf16"
    arch, pre, syn = cfg.foundation.arch, cfg.foundation.pretrain, cfg.synthesis
    pipe = build_foundation(arch)
    vae, unet, te = pipe.vae, pipe.unet, pipe.text_encoder
    s = arch.image_size
    x = torch.randn(pre.vae_batch_size, arch.image_channels, s, s)
    opt = torch.optim.AdamW(vae.parameters())

    def vae_step():
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.sample()).sample - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    h = unet.config.sample_size
    z = torch.randn(pre.batch_size, arch.latent_channels, h, h)
    ids = pipe.tokenizer(["a photo of a coat"] * pre.batch_size, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    t = torch.randint(0, 1000, (pre.batch_size,))
    opt2 = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()))

    def unet_step():
        loss = unet(z, t, encoder_hidden_states=te(ids)[0]).sample.pow(2).mean()
        opt2.zero_grad()
        loss.backward()
        opt2.step()

    with torch.no_grad():
        ctx = te(ids)[0]
        fwd = timed(lambda: unet(z, t, encoder_hidden_states=ctx), args.repeats, bf16)
    requests = plan_requests(0, syn.batch_size, 0, [f"c{i}" for i in range(10)], syn.prompt_template)
    gen = timed(lambda: generate_batch(pipe, requests, syn.num_inference_steps, syn.guidance_scale), 2, bf16)
    result = {
        "config": args.config, "overrides": args.overrides, "threads": args.threads,
        "params_M": {"vae": sum(p.numel() for p in vae.parameters()) / 1e6,
                     "unet": sum(p.numel() for p in unet.parameters()) / 1e6,
                     "text_encoder": sum(p.numel() for p in te.parameters()) / 1e6},
        "autocast": args.autocast, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vae_train_steps_per_s": 1 / timed(vae_step, args.repeats, bf16),
        "unet_train_steps_per_s": 1 / timed(unet_step, args.repeats, bf16),
        "unet_forward_image_steps_per_s": pre.batch_size / fwd,
        "generate_images_per_s": syn.batch_size / gen,
        "batch": {"vae": pre.vae_batch_size, "unet": pre.batch_size, "generate": syn.batch_size},
        "sampling": {"steps": syn.num_inference_steps, "guidance": syn.guidance_scale},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
