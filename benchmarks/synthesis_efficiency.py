"""Ray synthesis pipeline images/s ÷ a bare loop's images/s, same model, batch and steps.

    .venv/bin/python benchmarks/synthesis_efficiency.py --config conf/quickstart.yaml --images 3000

The bare loop calls ``generate_batch`` in this process (no Ray, no encoding, no writing). The
pipeline is the real synthesis stage (plan → Ray Data actor pool → PNG encode → shard write →
manifest), timed from the call to the manifest, actor start-up included, into a temporary
output root. Uses the config's foundation model (pretrained by the pipeline, or foundation.path);
``--untrained`` builds the config's architecture with random weights instead (speed does not
depend on the weights; no 25-minute pretraining first).

    .venv/bin/python benchmarks/synthesis_efficiency.py --config conf/quickstart.yaml --images 12000 --untrained
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
from synthset.diffusion.text_to_image_sampler import generate_batch  # noqa: E402
from synthset.methods.class_prompt import plan_requests  # noqa: E402
from synthset.models.foundation import build_foundation, load_foundation  # noqa: E402
from synthset.pipeline import validate_inputs  # noqa: E402
from synthset.stages.common import init_ray  # noqa: E402
from synthset.stages.foundation import foundation_model_path  # noqa: E402
from synthset.stages.synthesize import run_synthesis  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--images", type=int, default=3000, help="rounded to whole classes")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--untrained", action="store_true", help="random weights of the config's architecture")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    names = validate_inputs(cfg)
    per_class = max(1, args.images // len(names))
    n = per_class * len(names)
    if args.untrained:
        model = tempfile.mkdtemp(prefix="synthset-untrained-")
        build_foundation(cfg.foundation.arch, seed=0).save_pretrained(model, safe_serialization=True)
        args.overrides.append(f"foundation.path={model}")
    else:
        model = foundation_model_path(cfg)
    syn = cfg.synthesis

    torch.set_num_threads(max(1, int(syn.actors.num_cpus)))
    pipe = load_foundation(model)
    requests = plan_requests(0, n, cfg.run.seed, names, syn.prompt_template)
    generate_batch(pipe, requests[:syn.batch_size], syn.num_inference_steps, syn.guidance_scale)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, syn.batch_size):
        generate_batch(pipe, requests[i:i + syn.batch_size], syn.num_inference_steps, syn.guidance_scale)
    bare = n / (time.perf_counter() - t0)
    del pipe

    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = load_config(args.config, args.overrides + [f"output.root={tmp}", f"synthesis.images_per_class={per_class}",
                                                             "tracking.enabled=false"])
        init_ray(run_cfg)
        t0, started = time.perf_counter(), time.time()
        summary = run_synthesis(run_cfg, model, names)
        wall = time.perf_counter() - t0
        pipeline = n / wall
        # Where the pipeline's time goes: per-shard stats say how long each actor spent in the
        # model and how long on the whole shard (model + waiting for encodes + tar + write).
        shards = [storage.read_json(p) for p in storage.list_files(storage.join(summary["dataset"], "_shards"), ".json")]
        model_s = sum(s["model_seconds"] for s in shards)
        shard_s = sum(s["seconds"] for s in shards)
        first_start = min(s["written_at"] - s["seconds"] for s in shards)
    print(json.dumps({"images": n, "batch_size": syn.batch_size, "steps": syn.num_inference_steps,
                      "guidance": syn.guidance_scale, "actors": syn.actors.model_dump(),
                      "bare_images_per_s": round(bare, 2), "pipeline_images_per_s": round(pipeline, 2),
                      "efficiency": round(pipeline / bare, 3),
                      "breakdown_s": {"wall": round(wall, 1), "in_model": round(model_s, 1),
                                      "in_shards_outside_model": round(shard_s - model_s, 1),
                                      "before_first_shard_started": round(first_start - started, 1)}},
                     indent=1))


if __name__ == "__main__":
    main()
