"""Guidance scale × sampling steps: Teacher agreement and Student accuracy, per setting.

    .venv/bin/python benchmarks/guidance_sweep.py --config conf/quickstart.yaml \
        --settings 1.5:10,2:10,3:10,1.5:20 --per-class 200

Uses the config's pretrained foundation model and Teacher (run the pipeline first). For each
``guidance:steps`` setting it generates ``per-class`` images per class (same seeds for every
setting), measures the share the Teacher labels as the prompted class, trains a soft-label and a
hard-label Student on them (the config's Student recipe, in-process) and scores both on the real
test set. Prints a Markdown table. Small ``per-class`` values understate Student accuracy.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from synthset.config import load_config  # noqa: E402
from synthset.data.splits import fit_images, make_splits, to_unit_tensor  # noqa: E402
from synthset.diffusion.text_to_image_sampler import generate_batch  # noqa: E402
from synthset.methods.class_prompt import plan_requests  # noqa: E402
from synthset.models.classifiers import build_classifier, load_classifier  # noqa: E402
from synthset.models.foundation import load_foundation  # noqa: E402
from synthset.models.training import fit_classifier, predict_proba  # noqa: E402
from synthset.stages.classifier import teacher_dir  # noqa: E402
from synthset.stages.foundation import foundation_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--settings", default="1.5:10,2:10,3:10")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-lambda-clip", action="store_true",
                        help="sample without the scheduler's λ clipping (reproduces the ill-conditioned first steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    teacher_stage = teacher_dir(cfg)
    if not teacher_stage.is_complete():
        raise SystemExit(f"no Teacher at {teacher_stage.uri}: run jobs/pipeline.py --config {args.config} first")
    splits = make_splits(cfg.data)
    names = splits.class_names
    pipe = load_foundation(foundation_model_path(cfg))
    if args.no_lambda_clip:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, lambda_min_clipped=-float("inf"))
    teacher = load_classifier(teacher_stage.uri)
    x_test = to_unit_tensor(fit_images(splits.test.images, cfg.data.image_size))
    requests = plan_requests(0, args.per_class * len(names), cfg.run.seed, names, cfg.synthesis.prompt_template)
    labels = torch.tensor([r["class_id"] for r in requests])
    clip = "off" if args.no_lambda_clip else pipe.scheduler.config.lambda_min_clipped
    print("| guidance | steps | λ clip | images | images/s | Teacher agreement | Student soft | Student hard |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.settings.split(","):
        guidance, steps = float(setting.split(":")[0]), int(setting.split(":")[1])
        t0 = time.time()
        images = np.concatenate([generate_batch(pipe, requests[i:i + cfg.synthesis.batch_size], steps, guidance)
                                 for i in range(0, len(requests), cfg.synthesis.batch_size)])
        rate = len(images) / (time.time() - t0)
        x = to_unit_tensor(images)
        probs = torch.from_numpy(predict_proba(teacher, x))
        agreement = float((probs.argmax(1) == labels).float().mean())
        accs = []
        for soft in (True, False):
            scfg = cfg.student
            student = build_classifier(scfg, len(names))
            bs = scfg.batch_size

            def batches(epoch):
                perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
                for i in range(0, len(x), bs):
                    idx = perm[i:i + bs]
                    yield x[idx], labels[idx], probs[idx]

            fit_classifier(student, batches, scfg.epochs, (len(x) + bs - 1) // bs, scfg.lr, scfg.weight_decay,
                           soft, scfg.temperature, scfg.augment, scfg.seed, name="student")
            accs.append(float((predict_proba(student, x_test).argmax(1) == splits.test.labels).mean()))
        print(f"| {guidance} | {steps} | {clip} | {len(images)} | {rate:.1f} | {agreement:.3f} | {accs[0]:.4f} | {accs[1]:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
