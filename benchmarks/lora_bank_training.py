"""K LoRAs trained in one bank (synthset.lora.train) vs the same K LoRAs trained one after another.

    .venv/bin/python benchmarks/lora_bank_training.py --config conf/quickstart.yaml --loras 16 --steps 20

Builds the config's foundation architecture (random weights: speed does not depend on them),
random scaled latents and prompt embeddings (one real image per LoRA, as in LoFT, unless
``--images-per-lora`` says more), then times ``train_lora_bank`` on a bank of ``--loras`` LoRAs
and ``--loras`` runs of ``train_lora_bank`` on a bank of one, same steps and ``--batch-per-lora``.
Both produce the same LoRAs (tests/lora/test_lora_bank.py checks it), so the ratio is pure speed.
``--targets locon --rank 32 --loras 1 --batch-per-lora 64 --bank-only`` times TCKR's LoCon step
of the quickstart (one LoRA, every sample the same mix) without the sequential comparison.
Reports wall-clock and process CPU time (the honest measure with ``--threads 1`` on a shared
machine); prints a JSON record and markdown table rows for docs/benchmarks.md.
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402

import synthset.methods  # noqa: E402,F401  (registers the methods a config may name)
from synthset.config import load_config  # noqa: E402
from synthset.lora.bank import inject_lora_bank  # noqa: E402
from synthset.lora.train import train_lora_bank  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--loras", type=int, default=16)
    parser.add_argument("--images-per-lora", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-lora", type=int, default=1)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--targets", default="attention", help="a preset of TARGET_PRESETS (attention, locon, ...)")
    parser.add_argument("--bank-only", action="store_true", help="time the bank alone (no sequential runs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    from diffusers import DDPMScheduler

    pipe = build_foundation(cfg.foundation.arch, seed=0)
    base_unet = pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    c = base_unet.config
    n = args.loras * args.images_per_lora
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = torch.randn(n, pipe.tokenizer.model_max_length, c.cross_attention_dim, generator=g)
    owner = torch.arange(args.loras).repeat_interleave(args.images_per_lora)
    kw = dict(steps=args.steps, batch_per_lora=args.batch_per_lora, lr=1e-3, seed=0, progress_every=1e9)

    def bank_run():
        unet = copy.deepcopy(base_unet)
        inject_lora_bank(unet, args.loras, rank=args.rank, targets=args.targets)
        train_lora_bank(unet, noise_scheduler, latents, cond, owner, num_loras=args.loras, **kw)

    def sequential_run():
        for k in range(args.loras):
            unet = copy.deepcopy(base_unet)
            inject_lora_bank(unet, 1, rank=args.rank, first_id=k, targets=args.targets)
            mine = owner == k
            train_lora_bank(unet, noise_scheduler, latents[mine], cond[mine], torch.zeros(int(mine.sum())),
                            num_loras=1, **kw)

    unet = copy.deepcopy(base_unet)  # warm-up (allocator, oneDNN primitives)
    inject_lora_bank(unet, 1, rank=args.rank, targets=args.targets)
    train_lora_bank(unet, noise_scheduler, latents[:1], cond[:1], [0], num_loras=1, **dict(kw, steps=2))
    wall, cpu = {}, {}
    runs = (("bank", bank_run),) if args.bank_only else (("bank", bank_run), ("sequential", sequential_run))
    for name, fn in runs:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall[name], cpu[name] = time.perf_counter() - w0, time.process_time() - c0

    record = {
        "config": args.config, "arch": cfg.foundation.arch.model_dump(), "loras": args.loras,
        "images_per_lora": args.images_per_lora, "steps": args.steps, "batch_per_lora": args.batch_per_lora,
        "rank": args.rank, "targets": args.targets, "threads": args.threads, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.processor() or platform.machine(),
        **{f"{clock}_{k}_s": round(v, 2) for clock, t in (("wall", wall), ("cpu", cpu)) for k, v in t.items()},
        "bank_steps_per_s": round(args.steps / wall["bank"], 3),
    }
    if args.bank_only:
        print(json.dumps(record, indent=1))
        print("command: .venv/bin/python " + " ".join(sys.argv))
        return
    record.update(wall_speedup=round(wall["sequential"] / wall["bank"], 2), cpu_speedup=round(cpu["sequential"] / cpu["bank"], 2))
    print(json.dumps(record, indent=1))
    print("| clock | LoRAs | steps | batch/LoRA | rank | bank s | sequential s | speedup |")
    for clock, t in (("wall", wall), ("cpu", cpu)):
        print(f"| {clock} | {args.loras} | {args.steps} | {args.batch_per_lora} | {args.rank} | {t['bank']:.1f} | "
              f"{t['sequential']:.1f} | {t['sequential'] / t['bank']:.2f}× |")
    print("command: .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
