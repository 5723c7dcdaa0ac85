"""CAS of every generation method on the embedded default: the issue-5 quality table.

    .venv/bin/python benchmarks/method_quality.py --config conf/quickstart.yaml --images-per-class 500 --shots 16

Runs the real ``jobs/pipeline.py`` once per variant into the config's output root, so the
foundation model and the Teacher are pretrained once and reused by every variant (their
stage hashes do not depend on the method). Each variant: [caption] → [adapt on k shots per
class of the private split] → generate → Teacher soft labels → Students (soft and hard labels,
the config's recipe) → accuracy on the real test set (CAS). Prints a Markdown table and writes
each variant's sample grid next to the summary. ``--only loft-0.5,tckr-1x`` runs a subset.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from synthset.config import config_hash, load_config  # noqa: E402


def variants(per_class: int, shots: int) -> dict[str, list[str]]:
    """name → overrides. TCKR's cardinality is relative to the real images it adapts on."""
    loft = ["synthesis.method=loft", "adapt.batch_per_lora=2"]
    return {
        "class_prompt": ["synthesis.method=class_prompt"],
        "caption_prompt": ["synthesis.method=caption_prompt"],
        "datadream": ["synthesis.method=datadream", "adapt.batch_per_lora=16"],
        "loft-0.5": loft + ["synthesis.fusion.lam=0.5"],
        "loft-1.0": loft + ["synthesis.fusion.lam=1.0"],
        "loft-beta10": loft + ["synthesis.fusion.beta_alpha=10"],
        "tckr-1x": ["synthesis.method=tckr", "adapt.batch_per_lora=32", f"synthesis.images_per_class={shots}"],
        "tckr-10x": ["synthesis.method=tckr", "adapt.batch_per_lora=32", f"synthesis.images_per_class={10 * shots}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--images-per-class", type=int, default=500)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="applied to every variant (e.g. adapt.steps=200)")
    args = parser.parse_args()
    common = [f"synthesis.images_per_class={args.images_per_class}", f"adapt.shots_per_class={args.shots}",
              *args.overrides]
    table = variants(args.images_per_class, args.shots)
    chosen = args.only.split(",") if args.only else list(table)
    rows = []
    for name in chosen:
        overrides = common + table[name]
        cfg = load_config(args.config, overrides)
        t0 = time.time()
        cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", args.config,
               *sum((["--set", o] for o in overrides), [])]
        log = Path(cfg.output.root).expanduser() / f"method-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(f"{name}: failed (exit {proc.returncode}), see {log}", flush=True)
            continue
        summary = json.loads((Path(cfg.output.root).expanduser().resolve()
                              / f"summary-{config_hash(cfg.to_dict())}.json").read_text())
        adapt = summary.get("adapt") or {}
        row = {"variant": name, "images": summary["images"], "teacher_agreement": summary["teacher_agreement_on_synthetic"],
               "student_soft": summary.get("student_soft_accuracy"), "student_hard": summary.get("student_hard_accuracy"),
               "adapt_s": adapt.get("seconds"), "adapt_loss": [adapt.get("loss_first"), adapt.get("loss_last")],
               "images_per_s": summary.get("images_per_s"), "grid": summary["sample_grid"],
               "teacher": summary["teacher_accuracy"], "wall_s": round(time.time() - t0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nTeacher (real private data): {rows[0]['teacher']:.4f}" if rows else "")
    print("| variant | images | Teacher agrees | Student soft | Student hard | adapt (s) | images/s | grid |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        adapt = f"{r['adapt_s']:.0f}" if r["adapt_s"] else "–"
        print(f"| {r['variant']} | {r['images']:,} | {r['teacher_agreement']:.1%} | {r['student_soft']:.4f} | "
              f"{r['student_hard']:.4f} | {adapt} | {r['images_per_s']:.1f} | {os.path.basename(r['grid'])} |")
    print(f"\ncommand: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")


if __name__ == "__main__":
    main()
