"""Write docs/quickstart.json from the summary that `make quickstart` left behind.

    make quickstart && .venv/bin/python benchmarks/record_quickstart.py [--wall-s 1712]

Reads ``<output.root>/summary-<config hash>.json`` of ``conf/quickstart.yaml`` (nothing is rerun).
``wall_s`` is the pipeline's own time from that summary (a first run: every stage), unless
``--wall-s`` gives the time measured around ``make quickstart``. ``classprompt_student_soft`` is the
ClassPrompt Student of the same data, foundation and Teacher when it was trained (else null).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import synthset.methods  # noqa: E402,F401  (registers the methods a config may name)
from synthset.config import config_hash, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "conf" / "quickstart.yaml"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "quickstart.json"))
    parser.add_argument("--wall-s", type=float, default=None, help="wall time measured around make quickstart")
    args = parser.parse_args()
    cfg = load_config(args.config)
    path = Path(cfg.output.root).expanduser()
    path = (path if path.is_absolute() else ROOT / path) / f"summary-{config_hash(cfg.to_dict())}.json"
    if not path.exists():
        raise SystemExit(f"{path}: no summary; run `make quickstart` first")
    summary = json.loads(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    baseline = summary.get("baseline") or {}
    record = {"commit": commit, "wall_s": round(args.wall_s if args.wall_s is not None else summary["seconds"]),
              "method": summary["method"], "teacher": summary["teacher_accuracy"],
              "student_soft": summary.get("student_soft_accuracy"), "student_hard": summary.get("student_hard_accuracy"),
              "classprompt_student_soft": baseline.get("student_soft_accuracy"),
              "classprompt_student_hard": baseline.get("student_hard_accuracy"),
              "images": summary["images"], "teacher_agreement": summary["teacher_agreement_on_synthetic"],
              "stage_seconds": summary["stage_seconds"], "pipeline_seconds": round(summary["seconds"])}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
