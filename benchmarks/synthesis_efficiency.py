"""Ray synthesis pipeline images/s ÷ a bare loop's images/s, same method, model, batch and steps.

    .venv/bin/python benchmarks/synthesis_efficiency.py --config conf/class_prompt.yaml --images 6000 --untrained

Works with any method's config: the method's own stages run first (captions, LoRAs, its generator:
cached by config hash like any run), then both sides use what the synthesis stage uses —
``Method.plan_requests``, ``load_generator`` and ``generate_batch`` — on the same requests. The bare
loop calls them in this process (no Ray, no encoding, no writing); the pipeline is the real synthesis
stage (plan → shard-pool actors → PNG encode → shard write → manifest), timed from the call to the
manifest, actor start-up included, into a temporary output root. ``--untrained`` builds the config's
foundation architecture with random weights (speed does not depend on the weights; no pretraining
first); otherwise the config's foundation model is used (pretrained by the pipeline, or foundation.path).
The bare loop runs before and after the pipeline; the reference is their mean (this machine's
speed drifts over minutes).
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import torch  # noqa: E402

from synthset import storage  # noqa: E402
from synthset.config import load_config  # noqa: E402
from synthset.methods import get_method  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402
from synthset.pipeline import validate_inputs  # noqa: E402
from synthset.stages.graph import plan_artifacts, run_method_stages  # noqa: E402
from synthset.stages.common import init_ray  # noqa: E402
from synthset.stages.foundation import foundation_model_path  # noqa: E402
from synthset.stages.synthesize import run_synthesis  # noqa: E402


def bare_loop(cfg, model: str, names: list[str], context, loras, n: int) -> float:
    """Images/s of the method's generator called in this process on the planned requests."""
    method, syn = get_method(cfg.synthesis.method), cfg.synthesis
    torch.set_num_threads(max(1, int(syn.actors.num_cpus)))
    generator = method.load_generator(model, loras, syn, "cpu", None)
    requests = method.plan_requests(0, n, cfg.run.seed, context)
    method.generate_batch(generator, requests[:syn.batch_size], syn)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, syn.batch_size):
        method.generate_batch(generator, requests[i:i + syn.batch_size], syn)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/class_prompt.yaml")
    parser.add_argument("--images", type=int, default=3000, help="rounded to whole classes")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--untrained", action="store_true", help="random weights of the config's architecture")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.untrained:
        model = tempfile.mkdtemp(prefix="synthset-untrained-")
        build_foundation(cfg.foundation.arch, seed=0).save_pretrained(model, safe_serialization=True)
        args.overrides.append(f"foundation.path={model}")
        cfg = load_config(args.config, args.overrides)
    names = validate_inputs(cfg)
    per_class = max(1, args.images // len(names))
    n = per_class * len(names)
    init_ray(cfg)
    model = foundation_model_path(cfg)
    done = run_method_stages(cfg, model)  # captions, LoRAs, a generator: what synthesis reads (cached)
    context = get_method(cfg.synthesis.method).plan_context(cfg, names, plan_artifacts(cfg, done))
    loras = done["adapt"]["loras"] if "adapt" in done else None
    if "generator" in done:
        model = done["generator"]["model"]
    syn = cfg.synthesis

    def cpu_seconds() -> dict[str, float]:
        """CPU seconds so far of this driver and of each other Ray process (by name)."""
        import psutil

        out = {}
        for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == os.getpid():
                name = "driver"
            elif "ray" in cmd:
                name = cmd.split(" ")[0].rsplit("/", 1)[-1][:40]
            else:
                continue
            t = p.info["cpu_times"]
            out[name] = out.get(name, 0.0) + (t.user + t.system if t else 0.0)
        return out

    def pipeline_run():
        nonlocal cpu
        before = cpu_seconds()
        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = load_config(args.config, args.overrides + [
                f"output.root={tmp}", f"synthesis.images_per_class={per_class}", "tracking.enabled=false"])
            t0, started = time.perf_counter(), time.time()
            summary = run_synthesis(run_cfg, model, names, context=context, loras=loras)
            wall = time.perf_counter() - t0
            # Where the pipeline's time goes: per-shard stats say how long each actor spent in the
            # model and how long on the whole shard (model + waiting for encodes + tar + write).
            shards = [storage.read_json(p)
                      for p in storage.list_files(storage.join(summary["dataset"], "_shards"), ".json")]
        after = cpu_seconds()
        cpu = {k: round(v - before.get(k, 0.0), 1) for k, v in after.items() if v - before.get(k, 0.0) > 0.5}
        startup.update({k: round(summary[k], 1) for k in ("actor_start_seconds", "actor_init_seconds")})
        return wall, shards, started

    cpu: dict = {}
    startup: dict = {}

    # The bare loop before and after the pipeline, and their mean as the reference: this machine's speed
    # drifts by ±10 % over minutes (other tenants), and a single bare run before or after would pick a side.
    bare_before = bare_loop(cfg, model, names, context, loras, n)
    wall, shards, started = pipeline_run()
    bare_after = bare_loop(cfg, model, names, context, loras, n)
    bare = (bare_before + bare_after) / 2
    pipeline = n / wall
    model_s = sum(s["model_seconds"] for s in shards)
    shard_s = sum(s["seconds"] for s in shards)
    first_start = min(s["written_at"] - s["seconds"] for s in shards)
    print(json.dumps({"config": args.config, "method": syn.method, "images": n, "batch_size": syn.batch_size,
                      "steps": syn.num_inference_steps, "guidance": syn.guidance_scale,
                      "actors": syn.actors.model_dump(),
                      "bare_images_per_s": round(bare, 2),
                      "bare_before_after": [round(bare_before, 2), round(bare_after, 2)], "pipeline_images_per_s": round(pipeline, 2),
                      "efficiency": round(pipeline / bare, 3),
                      "breakdown_s": {"wall": round(wall, 1), "in_model": round(model_s, 1),
                                      "in_model_images_per_s": round(n / model_s, 2),
                                      "in_shards_outside_model": round(shard_s - model_s, 1),
                                      "before_first_shard_started": round(first_start - started, 1), **startup},
                      "pipeline_cpu_s": cpu},
                     indent=1))


if __name__ == "__main__":
    main()
