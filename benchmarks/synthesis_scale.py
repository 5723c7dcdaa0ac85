"""Memory at scale: does the synthesis job's memory grow with the number of images?

    .venv/bin/python benchmarks/synthesis_scale.py --sizes 10000 100000 1000000

Runs the real ``jobs/generate.py`` (plan → Ray Data actor pool → PNG → shards → manifest) with a
cheap configuration — the tiny config's architecture, untrained (speed and memory do not depend
on the weights), one denoising step, no guidance — for each size N, each into a fresh output
root. Reports wall time, the driver's peak RSS (from the stage summary), each actor's peak RSS
(from the per-shard stats: at its first shard and at its last), and checks the result: the
manifest's sample and shard counts, every shard's sha256 against the manifest, and N unique keys
in the tars. Outputs are deleted after each size unless ``--keep``.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import synthset.methods  # noqa: E402,F401  (registers the methods a config may name)
from synthset.config import load_config  # noqa: E402
from synthset.models.foundation import build_foundation  # noqa: E402

CHEAP = ["synthesis.num_inference_steps=1", "synthesis.guidance_scale=0", "synthesis.batch_size=500",
         "synthesis.shard_size=2000", "synthesis.actors.num_cpus=2", "tracking.enabled=false"]


def verify(data: Path, n: int, shard_size: int) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    keys: set[str] = set()
    members = 0
    for entry in manifest["shards"]:
        blob = (data / entry["shard"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise SystemExit(f"{entry['shard']}: sha256 differs from the manifest")
        with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    keys.add(m.name.split(".")[0])
                    members += 1
    ok = (manifest["num_samples"] == n and len(manifest["shards"]) == math.ceil(n / shard_size)
          and members == n and len(keys) == n)
    if not ok:
        raise SystemExit(f"{data}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
                         f"{members} members, {len(keys)} unique keys; expected {n}")
    return {"shards": len(manifest["shards"]), "unique_keys": len(keys)}


def actor_memory(data: Path) -> dict:
    """Per actor pid: peak RSS at its first and last shard (by write time)."""
    per_pid: dict[int, list] = {}
    for p in (data / "_shards").glob("*.json"):
        s = json.loads(p.read_text())
        per_pid.setdefault(s["pid"], []).append((s["written_at"], s["peak_rss_mb"]))
    return {pid: (sorted(v)[0][1], sorted(v)[-1][1], len(v)) for pid, v in per_pid.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    overrides = CHEAP + args.overrides
    cfg = load_config(args.config, overrides)
    classes = 10
    work = Path(args.workdir or tempfile.mkdtemp(prefix="synthset-scale-"))
    model = work / "model"
    if not model.exists():
        build_foundation(cfg.foundation.arch, seed=0).save_pretrained(model, safe_serialization=True)
    rows = []
    for n in args.sizes:
        root = work / f"n{n}"
        cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", args.config,
               *sum((["--set", o] for o in overrides), []), "--set", f"output.root={root}",
               "--set", f"foundation.path={model}", "--set", f"synthesis.images_per_class={n // classes}"]
        t0 = time.time()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.time() - t0
        summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
        data = Path(summary["dataset"])
        check = verify(data, n, cfg.synthesis.shard_size)
        actors = actor_memory(data)
        row = {"images": n, "wall_s": round(wall, 1), "images_per_s_stage": round(summary["images_per_s"], 1),
               "driver_peak_rss_mb": round(summary["driver_peak_rss_mb"]),
               "actors": {str(pid): {"first_shard_peak_mb": round(a), "last_shard_peak_mb": round(b), "shards": k}
                          for pid, (a, b, k) in actors.items()},
               **check}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| images | shards | unique keys | wall (s) | stage images/s | driver peak RSS (MB) | "
          "actor peak RSS at first → last shard (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        acts = ", ".join(f"{a['first_shard_peak_mb']} → {a['last_shard_peak_mb']} ({a['shards']} shards)"
                         for a in r["actors"].values())
        print(f"| {r['images']:,} | {r['shards']} | {r['unique_keys']:,} | {r['wall_s']} | {r['images_per_s_stage']} "
              f"| {r['driver_peak_rss_mb']} | {acts} |")
    print(f"\ncommand: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")


if __name__ == "__main__":
    main()
