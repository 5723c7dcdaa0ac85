"""Memory and time of every stage on an image folder of N images: does anything grow with the dataset?

    .venv/bin/python benchmarks/data_scale.py --images 5000 20000 --size 128 --out docs/data_scale.json

For each N: a procedural RGB folder of N images at ``--size`` px, ten classes with learnable differences
(``data/procedural.py``), run through the real stages of ``conf/own_data.yaml`` with CaptionPrompt
(captions of the private images, the embedded ``properties`` captioner) and an untrained foundation model
of the config's architecture at ``--size`` px saved by path (speed and memory do not depend on its
weights): prepare → Teacher → caption → synthesis of ``--synthetic`` images (fixed, whatever N) → label →
replication gate → Students (soft, hard) → evaluate. Three quarters of the folder's training images are
the private split, no public split.

While a stage runs, a thread samples the RSS of this driver and of every Ray worker process every
0.1 s; a stage's figure is the largest RSS of any one process that used more than 0.5 s of CPU during
it (an idle worker left from an earlier stage is not counted), with its seconds. The JSON gives, per N,
``{"stages": {name: {"peak_rss_mb", "seconds", "process"}}}``, and the ratio of each stage's peak at
the largest N to the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


class StagePeaks:
    """Samples the RSS of this process and of Ray's worker processes while a stage runs."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.psutil, self.every = psutil, every
        self.peaks: dict[int, tuple[float, str]] = {}
        self.cpu0: dict[int, float] = {}
        self._stop = threading.Event()

    def _processes(self):
        me = self.psutil.Process()
        for p in self.psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except self.psutil.Error:
                continue
            if p.pid == me.pid or cmd.startswith("ray::") or "default_worker.py" in cmd:
                yield p, ("driver" if p.pid == me.pid else cmd.split(" ")[0][:60])

    def _cpu(self, p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        for p, name in self._processes():
            try:
                rss = p.memory_info().rss / 2 ** 20
                self.cpu0.setdefault(p.pid, self._cpu(p))
            except self.psutil.Error:
                continue
            if rss > self.peaks.get(p.pid, (0, ""))[0]:
                self.peaks[p.pid] = (rss, name)

    def __enter__(self):
        self.t0 = time.time()
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self._sample()
        self.seconds = time.time() - self.t0
        active = {}
        for pid, (rss, name) in self.peaks.items():
            try:
                used = self._cpu(self.psutil.Process(pid)) - self.cpu0.get(pid, 0.0)
            except self.psutil.Error:
                used = 1.0  # ended during the stage (a pool actor): it worked
            if used > 0.5 or name == "driver":
                active[pid] = (rss, name)
        pid, (rss, name) = max(active.items(), key=lambda kv: kv[1][0])
        self.result = {"peak_rss_mb": round(rss, 1), "seconds": round(self.seconds, 1), "process": name}
        return False


def run_once(images: int, size: int, synthetic: int, work: str) -> dict:
    from synthset.config import load_config
    from synthset.data.procedural import write_image_folder
    from synthset.models.foundation import build_foundation
    from synthset.pipeline import run_generation, validate_inputs
    from synthset.stages.caption import run_caption
    from synthset.stages.classifier import run_student, run_teacher
    from synthset.stages.common import init_ray
    from synthset.stages.evaluate import run_evaluate, student_training_set
    from synthset.stages.prepare import run_prepare
    from synthset.stages.synthesize import run_label

    folder = os.path.join(work, f"folder-{images}-{size}")
    if not os.path.exists(os.path.join(folder, ".complete")):
        write_image_folder(folder, images, size=size, classes=10, seed=0)
        open(os.path.join(folder, ".complete"), "w").close()
    base = load_config(os.path.join(ROOT, "conf", "own_data.yaml"), [f"data.image_size={size}",
                                                                      f"foundation.arch.image_size={size}"])
    model = os.path.join(work, f"foundation-{size}")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        build_foundation(base.foundation.arch, seed=0).save_pretrained(model, safe_serialization=True)
    train_images = int(images * 0.8 * 0.97)  # what data.test_fraction leaves, with room for the hash's spread
    cfg = load_config(os.path.join(ROOT, "conf", "own_data.yaml"), [
        f"data.path={folder}", f"data.image_size={size}", f"foundation.arch.image_size={size}",
        f"foundation.path={model}", "data.splits.public=0", f"data.splits.private={train_images * 3 // 4}",
        f"output.root={os.path.join(work, f'runs-{images}')}", "tracking.enabled=false", "ray.num_cpus=2",
        "synthesis.method=caption_prompt", f"synthesis.images_per_class={synthetic // 10}",
        "synthesis.num_inference_steps=2", "synthesis.batch_size=50", "synthesis.shard_size=500",
        "teacher.epochs=2", "teacher.input_blur=null", "student.epochs=2", "student.input_blur=null",
        "evaluate.sample_size=1000", "evaluate.kid_subset_size=500", "replication.calibration_size=2000"])
    names = validate_inputs(cfg, prepare=False)
    init_ray(cfg)
    stages = {}

    def stage(name, fn):
        print(f"--- {name} ({images} images)", flush=True)
        with StagePeaks() as peaks:
            out = fn()
        stages[name] = peaks.result
        print(f"--- {name}: {peaks.result}", flush=True)
        return out

    stage("prepare", lambda: run_prepare(cfg))
    teacher = stage("teacher", lambda: run_teacher(cfg))
    stage("caption", lambda: run_caption(cfg))
    synthesis = stage("synthesis", lambda: run_generation(cfg, names))
    label = stage("label", lambda: run_label(cfg, synthesis["dataset"], teacher["model"]))
    train_set = stage("replication", lambda: student_training_set(cfg, label["dataset"]))
    stage("student", lambda: [run_student(cfg, train_set, labels) for labels in cfg.student.labels])
    stage("evaluate", lambda: run_evaluate(cfg))
    import ray

    ray.shutdown()
    return {"images": images, "private_images": cfg.data.splits.private, "synthetic_images": synthetic,
            "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--synthetic", type=int, default=2000, help="synthetic images (fixed for every N)")
    parser.add_argument("--work", default=None, help="where folders and runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one N, JSON on stdout
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="synthset-scale-")
    if args.one is not None:
        print("RESULT " + json.dumps(run_once(args.one, args.size, args.synthetic, work)), flush=True)
        return
    runs = []
    for n in args.images:  # one fresh process per N: nothing one run left in memory counts in the next
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--size", str(args.size), "--synthetic",
                               str(args.synthetic), "--work", work], stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            raise SystemExit(f"run with {n} images failed ({proc.returncode})")
        runs.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    small, large = runs[0]["stages"], runs[-1]["stages"]
    out = {"commit": commit.stdout.strip(), "command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]),
           "image_size": args.size, "runs": runs,
           "peak_ratio_largest_to_smallest": {k: round(large[k]["peak_rss_mb"] / small[k]["peak_rss_mb"], 3)
                                              for k in small}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
