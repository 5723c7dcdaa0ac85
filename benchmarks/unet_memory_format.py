"""UNet training step (fwd+bwd) in NCHW vs channels_last, for the foundation architecture of a config.

    .venv/bin/python benchmarks/unet_memory_format.py --config conf/quickstart.yaml [--batch 128] [--threads 2]

Random weights and inputs (speed does not depend on them); mean of ``--repeats`` steps after 2 warm-ups.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402

from synthset.config import load_config  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402


def step_seconds(unet, x, t, ctx, repeats: int) -> float:
    for _ in range(2):
        unet(x, t, encoder_hidden_states=ctx).sample.sum().backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, encoder_hidden_states=ctx).sample.sum().backward()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = load_config(args.config).foundation.arch
    pipe = build_foundation(arch)
    unet = pipe.unet.train()
    c = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    ctx = torch.randn(args.batch, arch.max_prompt_tokens, c.cross_attention_dim, generator=g)
    nchw = step_seconds(unet, x, t, ctx, args.repeats)
    unet.to(memory_format=torch.channels_last)
    nhwc = step_seconds(unet, x.contiguous(memory_format=torch.channels_last), t, ctx, args.repeats)
    print(f"fwd+bwd, batch {args.batch}: NCHW {nchw:.3f} s, channels_last {nhwc:.3f} s ({nhwc / nchw - 1:+.0%})")


if __name__ == "__main__":
    main()
