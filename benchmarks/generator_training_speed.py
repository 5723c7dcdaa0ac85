"""Steps/s of CASD's generator training under Ray Train with 1 and 2 workers (and the time to resume).

    nice -n 19 .venv/bin/python benchmarks/generator_training_speed.py --config conf/casd.yaml --steps 40 --workers 1 2

Trains the config's network (``synthesis.casd.model``, ``train.batch_size``) on random images of the
configured size for ``--steps`` steps with ``fit_generator`` (the stage's own driver), once per worker
count, each worker on ``--cpus-per-worker`` CPU threads. steps/s is measured inside the workers from their
first step to the last checkpoint (Ray start-up and worker creation excluded); ``wall_s`` is the whole fit.
``--resume`` also times a second fit of the finished run (Ray Train restores the last checkpoint and ends):
the fixed cost of resuming. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/casd.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import ray
    import torch
    from safetensors.torch import save_file

    import synthset.methods  # noqa: F401  (registers the methods a config may name)
    from synthset.config import load_config
    from synthset.diffusion.generator_training import TrainingSet, TrainSettings, fit_generator, save_training_set
    from synthset.diffusion.pixel_unet import build_pixel_unet

    cfg = load_config(args.config)
    casd, size = cfg.synthesis.casd, cfg.data.image_size
    tmp = tempfile.mkdtemp(prefix="generator-speed-")
    g = torch.Generator().manual_seed(0)
    n = 2000
    data = TrainingSet(torch.rand(n, cfg.data.channels, size, size, generator=g) * 2 - 1, torch.arange(n) % 10,
                       torch.arange(n) % 2, num_classes=10)
    save_training_set(os.path.join(tmp, "data.safetensors"), data)
    net = build_pixel_unet(casd.model, size, cfg.data.channels, num_classes=10, num_sources=2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(tmp, "init.safetensors"))
    ray.init(num_cpus=max(args.workers) * args.cpus_per_worker, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": sys.path[0], "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    for workers in args.workers:
        kwargs = dict(network_config=dict(net.config), init_weights=os.path.join(tmp, "init.safetensors"),
                      training_set=os.path.join(tmp, "data.safetensors"), settings=TrainSettings.from_config(casd.train),
                      steps=args.steps, storage_path=os.path.join(tmp, "ray"), name=f"speed-{workers}",
                      workers=workers, cpus_per_worker=args.cpus_per_worker, checkpoint_every=args.steps)
        t0 = time.time()
        result = fit_generator(**kwargs)
        wall = time.time() - t0
        row = {"workers": workers, "cpus_per_worker": args.cpus_per_worker, "batch_size": casd.train.batch_size,
               "image_size": size, "channels": casd.model.channels, "steps": result["step"],
               "steps_per_s": round(result["step"] / result["seconds"], 3), "wall_s": round(wall, 1),
               "parameters": sum(p.numel() for p in net.parameters())}
        if args.resume:
            t0 = time.time()
            fit_generator(**kwargs)
            row["resume_finished_run_wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
