"""Fused per-sample LoRA generation (LoFT Eq. 4, synthset.lora.fused) vs no LoRA and vs set_adapters.

    .venv/bin/python benchmarks/lora_fused_throughput.py --config conf/quickstart.yaml --images-per-class 500

Builds the config's foundation architecture (random weights: speed does not depend on them) and a
bank of ``--loras-per-class`` rank-2 LoRAs per class with random A and B. Every request gets its
own same-class pair (i, j) and λ ~ U(0, 1), as in a LoFT plan. Three ways to make the images:

* ``base``: ``text_to_image_sampler.generate_batch`` without any LoRA (the ceiling);
* ``fused``: ``fused_generate``, one pipeline call per batch, each sample its own pair and λ;
* ``reference``: LoFT's released approach, peft adapters activated with
  ``unet.set_adapters([i, j], [λ, 1 - λ])`` and one image per pipeline call (adapters preloaded,
  which favours it: the original also loads LoRA files per pair). Slow, so it is timed on the
  first ``--reference-images`` requests and reported as images/s.

Batch size, steps and guidance come from the config's ``synthesis`` section. ``base`` and ``fused``
alternate batch by batch so that load from other processes hits both alike. Both wall-clock and
process CPU time are reported: on a shared machine with ``--threads 1``, CPU time is the honest
measure of the work (wall time also counts waiting for other processes). Prints a JSON record and
markdown table rows for docs/benchmarks.md.
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

from synthset.config import load_config  # noqa: E402
from synthset.data.sources import FASHION_MNIST_CLASSES  # noqa: E402
from synthset.lora.bank import add_peft_adapter, bank_from_model, inject_lora_bank  # noqa: E402
from synthset.lora.fused import fused_generate  # noqa: E402
from synthset.methods import PlanContext  # noqa: E402
from synthset.methods import plan_requests as plan_methods  # noqa: E402
from synthset.diffusion.text_to_image_sampler import generate_batch  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402


def loft_requests(n: int, run_seed: int, class_names: list[str], prompt_template: str, loras_per_class: int) -> list[dict]:
    """The LoFT plan (``methods.loft``) over ``loras_per_class`` LoRAs per class, λ ~ Beta(1, 1) = U(0, 1)."""
    loras = {c: list(range(c * loras_per_class, (c + 1) * loras_per_class)) for c in range(len(class_names))}
    context = PlanContext(class_names, prompt_template, loras=loras, fusion={"mode": "pair", "beta_alpha": 1.0})
    return plan_methods("loft", 0, n, run_seed, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--images-per-class", type=int, default=500)
    parser.add_argument("--loras-per-class", type=int, default=16, help="LoFT: k real images per class")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--reference-images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    syn = cfg.synthesis
    names = FASHION_MNIST_CLASSES
    n = args.images_per_class * len(names)
    requests = loft_requests(n, cfg.run.seed, names, syn.prompt_template, args.loras_per_class)
    steps, guidance, bs = syn.num_inference_steps, syn.guidance_scale, syn.batch_size

    pipe = build_foundation(cfg.foundation.arch, seed=0)
    plain_unet = copy.deepcopy(pipe.unet)
    lora_unet = pipe.unet
    layers = inject_lora_bank(lora_unet, args.loras_per_class * len(names), rank=args.rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    bank = bank_from_model(lora_unet)
    plain = copy.copy(pipe)
    plain.unet = plain_unet

    batches = [requests[i:i + bs] for i in range(0, n, bs)]
    generate_batch(plain, batches[0], steps, guidance)  # warm-up both paths
    fused_generate(pipe, batches[0], steps, guidance)
    wall = {"base": 0.0, "fused": 0.0, "reference": 0.0}
    cpu = dict(wall)
    for b, batch in enumerate(batches):
        for kind in (("base", "fused") if b % 2 == 0 else ("fused", "base")):
            w0, c0 = time.perf_counter(), time.process_time()
            if kind == "base":
                generate_batch(plain, batch, steps, guidance)
            else:
                fused_generate(pipe, batch, steps, guidance)
            wall[kind] += time.perf_counter() - w0
            cpu[kind] += time.process_time() - c0

    ref = copy.copy(pipe)
    ref.unet = copy.deepcopy(plain_unet)
    timed = requests[:args.reference_images]
    for lora_id in sorted({i for r in timed for i in r["lora_ids"]}):
        add_peft_adapter(ref.unet, bank, lora_id)
    ref.unet.set_adapters([f"lora_{i}" for i in timed[0]["lora_ids"]], timed[0]["lora_weights"])
    generate_batch(ref, timed[:1], steps, guidance)  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for r in timed:
        ref.unet.set_adapters([f"lora_{i}" for i in r["lora_ids"]], r["lora_weights"])
        generate_batch(ref, [r], steps, guidance)
    wall["reference"], cpu["reference"] = time.perf_counter() - w0, time.process_time() - c0
    counts = {"base": n, "fused": n, "reference": len(timed)}
    ips = {clock: {k: counts[k] / t[k] for k in t} for clock, t in (("wall", wall), ("cpu", cpu))}

    record = {
        "config": args.config, "arch": cfg.foundation.arch.model_dump(), "images": n, "classes": len(names),
        "loras": bank.num_loras, "rank": args.rank, "batch_size": bs, "steps": steps, "guidance": guidance,
        "threads": args.threads, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": platform.processor() or platform.machine(), "reference_images_timed": len(timed),
        **{f"{clock}_{k}_images_per_s": round(v, 3) for clock in ips for k, v in ips[clock].items()},
        **{f"{clock}_fused_over_base": round(ips[clock]["fused"] / ips[clock]["base"], 3) for clock in ips},
        **{f"{clock}_fused_over_reference": round(ips[clock]["fused"] / ips[clock]["reference"], 1) for clock in ips},
    }
    print(json.dumps(record, indent=1))
    print("| clock | images | LoRAs (rank) | batch | steps | base img/s | fused img/s | fused/base "
          "| set_adapters img/s | fused/set_adapters |")
    for clock, v in ips.items():
        print(f"| {clock} | {n} | {bank.num_loras} ({args.rank}) | {bs} | {steps} | {v['base']:.2f} | {v['fused']:.2f} | "
              f"{v['fused'] / v['base']:.3f} | {v['reference']:.3f} | {v['fused'] / v['reference']:.1f}× |")
    print("command: .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
