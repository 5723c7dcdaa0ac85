"""CAS of the generation methods on the embedded default, over seeds, with the real-data ceiling.

    .venv/bin/python benchmarks/method_quality.py --config conf/quickstart.yaml \\
        --images-per-class 500 --seeds 0,1,2 --json docs/method_quality.json

Runs the real ``jobs/pipeline.py`` once per (variant, seed) into the config's output root, so
the foundation model and the Teacher are pretrained once and reused by every run (their stage
hashes do not depend on the method or on these seeds). A seed sets ``run.seed`` (the generation
plan), ``adapt.seed`` (which real shots the LoRAs see, their init and noise) and ``student.seed``.
Each run: [caption] → [adapt] → generate → Teacher soft labels → Students (soft and hard labels,
the config's recipe) → accuracy on the real test set (CAS). The ``real`` row trains the same
Student recipe on the same number of *real* private images (seeded per class; soft labels from
the Teacher, hard labels the true ones): the ceiling a generator could reach at this cardinality.
Its "Teacher agrees" is the Teacher's accuracy on those images as the Student sees them (after the
VAE round trip for ``real-vae``).

Prints one row per variant, mean ± standard error over the seeds, and writes ``--json``
(per variant: images, seeds, student_soft_mean/se, student_hard_mean/se, and every run).
``--only class_prompt,datadream`` runs a subset; ``--set key=value`` applies to every run;
``--variant 'name:key=value key=value'`` adds a named row (e.g. CASD's baselines under conf/casd.yaml:
``--variant 'dm:synthesis.casd.variant=dm'``), run in the order given after ``--only``'s.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from synthset.config import Config, config_hash, load_config  # noqa: E402


def variants(shots: int) -> dict[str, list[str]]:
    """name → overrides. TCKR's cardinality is relative to the real images it adapts on."""
    loft = ["synthesis.method=loft", "adapt.batch_per_lora=2"]
    return {
        "class_prompt": ["synthesis.method=class_prompt"],
        "caption_prompt": ["synthesis.method=caption_prompt"],
        # The seeds' recipes (LoRA on the attention projections only).
        "datadream": ["synthesis.method=datadream", "adapt.batch_per_lora=16", "adapt.targets=attention"],
        "loft-0.5": loft + ["synthesis.fusion.lam=0.5", "adapt.targets=attention"],
        "loft-1.0": loft + ["synthesis.fusion.lam=1.0", "adapt.targets=attention"],
        "loft-beta10": loft + ["synthesis.fusion.beta_alpha=10", "adapt.targets=attention"],
        "tckr-10x": ["synthesis.method=tckr", "adapt.batch_per_lora=32", "adapt.targets=attention",
                     f"synthesis.images_per_class={10 * shots}"],
        # LoCon: the same per-class LoRAs on the attention, feed-forward and convolution layers (issue 10).
        "datadream-locon": ["synthesis.method=datadream", "adapt.batch_per_lora=16", "adapt.targets=locon",
                            "adapt.lr=0.001"],
        # TCKR's one dataset LoRA as LoCon (conf/tckr_locon.yaml) over the whole private split, at the
        # same cardinality as the prompt-only rows.
        "tckr-locon": ["synthesis.method=tckr", "adapt.shots_per_class=null", "adapt.targets=locon", "adapt.rank=32",
                       "adapt.lr=0.001", "adapt.steps=400", "adapt.batch_per_lora=64", "adapt.cpus_per_worker=2"],
        # The platform's default (conf/quickstart.yaml): whatever the config's adapt section says.
        "default": [],
        "real": [],  # handled by real_run
        "real-vae": [],  # real_run through the foundation's VAE: the ceiling of anything decoded by it
    }


def seed_overrides(seed: int, adapt_seed: int | None = None) -> list[str]:
    """A run's seeds; ``adapt_seed`` fixed: every seed reuses one adaptation (its LoRAs), so the spread
    is that of generation and Student alone, not of which shots and LoRA init were drawn."""
    return [f"run.seed={seed}", f"adapt.seed={seed if adapt_seed is None else adapt_seed}", f"student.seed={seed}"]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``'name:key=value key=value'`` → (name, overrides)."""
    name, sep, rest = spec.partition(":")
    overrides = rest.split()
    if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides):
        raise SystemExit(f"--variant {spec!r}: expected NAME:key=value [key=value ...]")
    return name.strip(), overrides


def pipeline_run(config: str, name: str, overrides: list[str]) -> dict | None:
    cfg = load_config(config, overrides)
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", config,
           *sum((["--set", o] for o in overrides), [])]
    log = Path(cfg.output.root).expanduser() / f"method-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"{name}: failed (exit {proc.returncode}), see {log}", flush=True)
        return None
    summary = json.loads((Path(cfg.output.root).expanduser().resolve()
                          / f"summary-{config_hash(cfg.to_dict())}.json").read_text())
    adapt = summary.get("adapt") or {}
    return {"images": summary["images"], "teacher_agreement": summary["teacher_agreement_on_synthetic"],
            "student_soft": summary.get("student_soft_accuracy"), "student_hard": summary.get("student_hard_accuracy"),
            "adapt_s": adapt.get("seconds"), "method": summary["method"], "grid": summary["sample_grid"],
            "teacher": summary["teacher_accuracy"], "fid": summary.get("gen_fid"), "kid": summary.get("gen_kid_mean"),
            "wall_s": round(time.time() - t0)}


def vae_roundtrip(cfg: Config, images: np.ndarray, vae=None) -> np.ndarray:
    """uint8 images encoded by a VAE (posterior mean) and decoded: what a generator that decodes
    through it could at best produce for them. ``vae``: the foundation's when None."""
    import torch

    from synthset.data.splits import to_unit_tensor
    from synthset.diffusion.text_to_image import encode_latents

    if vae is None:
        from synthset.models.foundation import load_foundation
        from synthset.stages.foundation import foundation_model_path

        vae = load_foundation(foundation_model_path(cfg)).vae
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            z = encode_latents(vae, to_unit_tensor(images[i:i + 256]))
            x = vae.decode(z).sample.clamp(-1, 1)
            out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).squeeze(-1).numpy())
    return np.concatenate(out)


def real_run(cfg: Config, per_class: int, seed: int, through_vae: bool = False, vae=None, vae_id: str = "") -> dict:
    """The config's Student recipe on ``per_class`` real private images per class (seeded);
    ``through_vae``: the same images after a round trip through the foundation's VAE, or through
    ``vae`` (named ``vae_id`` in the dataset key and the row) when given."""
    import torch

    from synthset import storage
    from synthset.data.shards import image_to_tensor, iter_shard, shard_paths, write_manifest, write_shard
    from synthset.data.splits import fit_images, make_splits
    from synthset.models.classifiers import load_classifier
    from synthset.models.training import predict_proba
    from synthset.stages.adapt import select_shots
    from synthset.stages.classifier import run_student, run_teacher
    from synthset.stages.common import StageDir, init_ray, output_root

    t0 = time.time()
    init_ray(cfg)
    teacher = run_teacher(cfg)
    splits = make_splits(cfg.data)
    names = splits.class_names
    picked = select_shots(splits.private.labels, len(names), per_class, seed)
    key = config_hash({"data": cfg.data.model_dump(mode="json"), "teacher": teacher["stage_hash"],
                       "per_class": per_class, "seed": seed,
                       **({"vae": [vae_id, config_hash(cfg.foundation.model_dump(mode="json"))] if vae_id else
                           config_hash(cfg.foundation.model_dump(mode="json"))} if through_vae else {})})
    dataset = storage.join(output_root(cfg), "real", key)
    if not storage.exists(storage.join(dataset, "manifest.json")):
        images = fit_images(splits.private.images[picked], cfg.data.image_size)
        if through_vae:
            images = vae_roundtrip(cfg, images, vae)
        labels = splits.private.labels[picked]
        model = load_classifier(storage.materialize(teacher["model"]))
        soft = predict_proba(model, torch.stack([image_to_tensor(im, cfg.data.image_size, 1) for im in images]))
        size = cfg.synthesis.shard_size
        stats = []
        for i, lo in enumerate(range(0, len(images), size)):
            samples = [{"key": f"real{int(splits.private_index[p]):08d}", "image": images[j], "cls": int(labels[j]),
                        "meta": {"real_index": int(splits.private_index[p])}, "soft": soft[j]}
                       for j, p in zip(range(lo, min(lo + size, len(images))), picked[lo:lo + size])]
            stats.append(write_shard(dataset, i, samples))
        write_manifest(dataset, {"class_names": names, "method": "real", "generator": None}, stats)
    # The Teacher's argmax against the true label, over the images as the Student sees them (after the
    # round trip for real-vae): how much of the soft labels' signal is right.
    right = [int(np.argmax(s["soft"]) == s["cls"]) for path in shard_paths(dataset) for s in iter_shard(path, False)]
    row = {"images": len(picked), "method": ("real-vae" + (f"-{vae_id}" if vae_id else "")) if through_vae else "real",
           "teacher": teacher["test_accuracy"], "teacher_agreement": float(np.mean(right))}
    for labels in cfg.student.labels:  # cfg.student.seed is the run's seed (seed_overrides)
        stage_hash = config_hash({"dataset": key, "student": cfg.student.model_dump(mode="json"), "labels": labels})
        name = f"student-{row['method']}-{labels}"
        stage = StageDir(name, stage_hash, storage.join(output_root(cfg), name, stage_hash))
        row[f"student_{labels}"] = run_student(cfg, dataset, labels, stage=stage)["test_accuracy"]
    row["wall_s"] = round(time.time() - t0)
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n; NaN for one value)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def _finite(obj):
    """NaN (an SE of one seed, a missing Student) as JSON null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--images-per-class", type=int, default=500)
    parser.add_argument("--shots", type=int, default=None, help="adapt.shots_per_class (default: the config's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--adapt-seed", type=int, default=None,
                        help="one adapt.seed for every seed (default: adapt.seed follows the seed)")
    parser.add_argument("--json", default=None, help="write the aggregated table here")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="applied to every run (e.g. adapt.steps=200)")
    parser.add_argument("--variant", dest="extra", action="append", default=[], metavar="NAME:OVERRIDES",
                        help="a named row: NAME, a colon, space-separated key=value overrides (repeatable)")
    args = parser.parse_args()
    common = [f"synthesis.images_per_class={args.images_per_class}", *args.overrides]
    if args.shots is not None:
        common.append(f"adapt.shots_per_class={args.shots}")
    shots = load_config(args.config, common).adapt.shots_per_class or args.images_per_class
    table = variants(shots)
    extra = dict(parse_variant(v) for v in args.extra)
    clash = sorted(set(extra) & set(table))
    if clash:
        raise SystemExit(f"--variant {clash}: already a built-in variant name; choose another")
    chosen = (args.only.split(",") if args.only else [] if extra else list(table)) + list(extra)
    table.update(extra)
    unknown = [c for c in chosen if c not in table]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {list(table)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for name in chosen:
        for seed in seeds:
            overrides = common + table[name] + seed_overrides(seed, args.adapt_seed)
            if name in ("real", "real-vae"):
                run = real_run(load_config(args.config, overrides), args.images_per_class, seed, name == "real-vae")
            else:
                run = pipeline_run(args.config, f"{name}-seed{seed}", overrides)
            if run is None:
                continue
            run.update(variant=name, seed=seed)
            runs.append(run)
            print(json.dumps(run), flush=True)
    rows = {}
    for name in chosen:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        soft, hard = mean_se([r.get("student_soft") for r in mine]), mean_se([r.get("student_hard") for r in mine])
        rows[name] = {"method": mine[0]["method"], "images": mine[0]["images"], "seeds": [r["seed"] for r in mine],
                      "student_soft_mean": soft[0], "student_soft_se": soft[1],
                      "student_hard_mean": hard[0], "student_hard_se": hard[1],
                      "teacher_agreement_mean": mean_se([r.get("teacher_agreement") for r in mine])[0]}
        for metric in ("fid", "kid"):  # the evaluate stage's, in the Teacher's feature space (when it ran)
            if any(r.get(metric) is not None for r in mine):
                rows[name][f"{metric}_mean"], rows[name][f"{metric}_se"] = mean_se([r.get(metric) for r in mine])
    command = " ".join([".venv/bin/python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    if runs:
        print(f"\nTeacher (real private data): {runs[0]['teacher']:.4f}")
    print("| variant | method | images | seeds | Student soft (mean ± SE) | Student hard (mean ± SE) | Teacher agrees "
          "| FID | KID |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        agree = r["teacher_agreement_mean"]
        gen = " | ".join(f"{r[m + '_mean']:.3f} ± {r[m + '_se']:.3f}" if m + "_mean" in r else "–" for m in ("fid", "kid"))
        print(f"| {name} | {r['method']} | {r['images']:,} | {len(r['seeds'])} | {r['student_soft_mean']:.4f} ± "
              f"{r['student_soft_se']:.4f} | {r['student_hard_mean']:.4f} ± {r['student_hard_se']:.4f} | "
              + (f"{agree:.1%} |" if not math.isnan(agree) else "– |") + f" {gen} |")
    print(f"\ncommand: {command}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        with open(args.json, "w") as f:
            json.dump(_finite({"command": command, "commit": commit, "config": args.config, "variants": rows,
                               "runs": runs}), f, indent=1, allow_nan=False, default=str)


if __name__ == "__main__":
    main()
