"""The privacy measurement of docs/privacy.md: conf/privacy.yaml at cardinality 1×, 5× and 10×.

    .venv/bin/python benchmarks/privacy_sweep.py [--wait]

Runs `jobs/pipeline.py` (foundation reused by path → Teacher → synthesis → label → replication gate →
Students → evaluation with LiRA) once per cardinality — `pipeline` shadows only at 1× — then
`jobs/tradeoff.py` over the three evaluations. Every stage is cached by config hash, so an
interrupted sweep resumes where it stopped. `--wait` first waits for the foundation model that
`conf/privacy.yaml` points at (the quickstart's) to exist. Logs: `runs/privacy/sweep-*.log`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))

CARDINALITIES = {1: ["privacy.shadow_modes=[classifier,pipeline]"], 5: ["privacy.shadow_modes=[classifier]"],
                 10: ["privacy.shadow_modes=[classifier]"]}


def main() -> None:
    from synthset.config import load_config
    from synthset.stages.evaluate import evaluate_dir

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wait", action="store_true", help="wait for foundation.path to exist")
    parser.add_argument("--config", default=os.path.join(ROOT, "conf", "privacy.yaml"))
    args = parser.parse_args()
    base = load_config(args.config)
    # A pipeline's foundation stage writes _SUCCESS.json beside model/ when the model is complete.
    stage = os.path.join(ROOT, os.path.dirname(base.foundation.path.rstrip("/")))
    marker = (os.path.join(stage, "_SUCCESS.json") if os.path.exists(os.path.join(stage, "config_hash.json"))
              else os.path.join(ROOT, base.foundation.path, "model_index.json"))
    while args.wait and not os.path.exists(marker):
        print(f"waiting for {marker}", flush=True)
        time.sleep(60)
    private = base.data.splits.private - base.data.splits.holdout
    classes = 10
    metrics = []
    os.makedirs(os.path.join(ROOT, base.output.root), exist_ok=True)
    for card, extra in CARDINALITIES.items():
        sets = [f"synthesis.images_per_class={card * private // classes}", *extra]
        cfg = load_config(args.config, sets)
        log = os.path.join(ROOT, base.output.root, f"sweep-{card}x.log")
        cmd = [sys.executable, os.path.join(ROOT, "jobs", "pipeline.py"), "--config", args.config]
        for s in sets:
            cmd += ["--set", s]
        print(f"[{card}x] {' '.join(cmd[1:])}  (log {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"[{card}x] exit {rc} after {time.time() - t0:.0f}s", flush=True)
        if rc:
            raise SystemExit(rc)
        metrics.append(evaluate_dir(cfg).path("metrics.json"))
    out = os.path.join(ROOT, base.output.root, "tradeoff")
    subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "tradeoff.py"), *metrics, "--out", out], check=True)
    for variant in ("offline",):
        subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "tradeoff.py"), *metrics, "--out",
                        out + "-" + variant, "--variant", variant], check=True)
    print(json.dumps({"metrics": metrics, "tradeoff": out}, indent=1))


if __name__ == "__main__":
    main()
