"""A training step (fwd+bwd) in NCHW vs channels_last: the foundation UNet, or the Student's classifier.

    .venv/bin/python benchmarks/unet_memory_format.py --config conf/quickstart.yaml [--batch 128] [--threads 2]
    .venv/bin/python benchmarks/unet_memory_format.py --config conf/quickstart.yaml --model student

Random weights and inputs (speed does not depend on them); mean of ``--repeats`` steps after 2 warm-ups.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import synthset.methods  # noqa: E402,F401  (registers the methods a config may name)
from synthset.config import load_config  # noqa: E402
from synthset.models.classifiers import build_classifier  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402


def step_seconds(step, repeats: int) -> float:
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def unet_steps(cfg, batch: int):
    """(NCHW step, channels_last step, module) for the foundation UNet."""
    arch = cfg.foundation.arch
    unet = build_foundation(arch).unet.train()
    c = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, arch.max_prompt_tokens, c.cross_attention_dim, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return (lambda: unet(x, t, encoder_hidden_states=ctx).sample.sum().backward(),
            lambda: unet(x_cl, t, encoder_hidden_states=ctx).sample.sum().backward(), unet)


def student_steps(cfg, batch: int):
    """(NCHW step, channels_last step, module) for the Student's classifier (input blur included)."""
    model = build_classifier(cfg.student, 10, in_channels=cfg.data.channels).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return (lambda: F.cross_entropy(model(x), y).backward(),
            lambda: F.cross_entropy(model(x_cl), y).backward(), model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", choices=["unet", "student"], default="unet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    nchw_step, nhwc_step, module = (unet_steps if args.model == "unet" else student_steps)(cfg, args.batch)
    nchw = step_seconds(nchw_step, args.repeats)
    module.to(memory_format=torch.channels_last)
    nhwc = step_seconds(nhwc_step, args.repeats)
    print(f"{args.model} fwd+bwd, batch {args.batch}: NCHW {nchw:.3f} s, channels_last {nhwc:.3f} s "
          f"({nhwc / nchw - 1:+.0%})")


if __name__ == "__main__":
    main()
