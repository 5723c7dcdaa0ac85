"""Memory follows the batch, not the dataset: prepare and a Teacher on folders of 2,000 and 6,000 images.

A fresh process prepares a folder of procedural 128-px RGB images and trains a Teacher on its private split
(3/4 of it) with ``teacher.in_memory_bytes`` far below its share, and reports the peak RSS each step adds
over the process before it (``VmHWM`` reset through ``/proc/self/clear_refs``). Going from 2,000 to 6,000
images adds 188 MiB of decoded pixels (141 MiB to the private split, 563 MiB as the float32 the model
reads). The code before the streaming prepare stage held the decoded folder about 2.5 times while
preparing and the private split as float32 in the Teacher, so its peaks grew by ~470 MiB and ~560 MiB;
now neither may grow by more than a quarter of the added pixels (47 MiB): a shard of PNGs while
preparing, a batch and a shuffle buffer while training (``benchmarks/data_scale.py`` measures every
stage at 5,000 and 20,000 images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, ray, torch  # Ray's modules load before the baseline (prepare imports them either way)
from synthset.config import load_config
from synthset.data.procedural import write_image_folder
from synthset.models.classifiers import build_classifier
from synthset.models.training import classifier_batches, fit_classifier
from synthset.stages import prepare
from synthset.stages.prepare import load_splits, run_prepare

prepare.PARALLEL_MIN_IMAGES = 10 ** 9  # both sizes in this process (a larger folder would start Ray)

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

folder, out = sys.argv[2], sys.argv[3]
n = int(sys.argv[4])
write_image_folder(folder, n, size=128, classes=10, seed=0)
cfg = load_config(None, ["data.source=image_folder", f"data.path={folder}", "data.channels=3",
                         "data.image_size=128", "foundation.arch.image_size=128", "data.splits.public=0",
                         f"data.splits.private={3 * n // 4}", f"output.root={out}", "tracking.enabled=false",
                         "teacher.width=8", "teacher.epochs=1", "teacher.batch_size=32",
                         "teacher.in_memory_bytes=8000000", "teacher.shuffle_bytes=8000000",
                         "teacher.loader_workers=0"])
torch.set_num_threads(1)
reset_peak(); base = status("VmRSS")
run_prepare(cfg)
prepare = status("VmHWM") - base
splits = load_splits(cfg)
reset_peak(); base = status("VmRSS")
batches, steps, _ = classifier_batches(splits.private, cfg.teacher, 128, 3)
model = build_classifier(cfg.teacher, len(splits.class_names), in_channels=3)
losses = fit_classifier(model, batches, 1, steps, 1e-3, 0.0, soft=False, temperature=1.0, augment=False, seed=0)
teacher = status("VmHWM") - base
print(json.dumps({"prepare_mb": prepare, "teacher_mb": teacher, "private": len(splits.private),
                  "steps": steps, "losses": len(losses), "decoded_mb": n * 128 * 128 * 3 / 2 ** 20}))
"""


def _measure(tmp_path, images: int) -> dict:
    out = tmp_path / str(images)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "platform"), str(out / "folder"),
                             str(out / "runs"), str(images)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["private"] == 3 * images // 4 and measured["losses"] == measured["steps"] > 0
    return measured


def test_prepare_and_teacher_peaks_do_not_grow_with_the_folder(tmp_path):
    require(os.path.exists("/proc/self/clear_refs"), "needs Linux's /proc/self/clear_refs")
    small, large = _measure(tmp_path, 2000), _measure(tmp_path, 6000)
    added = large["decoded_mb"] - small["decoded_mb"]  # 188 MiB
    for step in ("prepare_mb", "teacher_mb"):
        assert large[step] - small[step] < added / 4, (step, small, large)
