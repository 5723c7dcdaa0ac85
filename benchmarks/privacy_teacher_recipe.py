"""How much a Teacher recipe leaks: LiRA (leave-one-out over shadows) against epochs, private-set size, width.

    .venv/bin/python benchmarks/privacy_teacher_recipe.py --private 1000 --holdout 250 \
        --recipe epochs=6,augment=true --recipe epochs=40,augment=false --num-shadows 8

For each ``--recipe`` (``key=value`` overrides of ``conf/privacy.yaml``'s ``teacher`` section) it trains
``--num-shadows`` models of that recipe in this process (no Ray), each on (private training split minus
the candidates) ∪ its random half of the candidates (``eval/membership.py``: the stage's own halves,
seeds and queries), and scores every model in turn as the target against the others
(``score_shadows``, Carlini et al. 2022's evaluation). That is the leakage of the *recipe* on this
private data, which is what the Teacher of ``conf/privacy.yaml`` is one sample of. Also reported: the
models' accuracy on their IN and OUT candidates (the overfitting LiRA feeds on) and on 2,000 real test
images. Prints one JSON line per recipe and writes them all to ``<out>/recipes.json``.

``--shadow-set DIR`` instead scores a shadow set the privacy stage already trained
(``<output.root>/privacy/classifier/<hash>``: ``candidates.json``, ``keep.npy``, ``shadows/``) the same way,
training nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))


def parse_recipe(text: str) -> dict:
    """``"epochs=40,augment=false"`` → {"epochs": 40, "augment": False} (YAML scalars)."""
    import yaml

    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--recipe {text!r}: expected key=value items, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def score_shadow_set(path: str) -> dict:
    """Leave-one-out LiRA over a stored shadow set (every shadow in turn the target) and its IN/OUT accuracy."""
    import numpy as np

    from synthset.eval.membership import membership_accuracy, score_shadows

    with open(os.path.join(path, "candidates.json")) as f:
        labels = np.asarray(json.load(f)["labels"])
    keep = np.load(os.path.join(path, "keep.npy"), allow_pickle=False)
    logits = np.stack([np.load(os.path.join(path, "shadows", f"shadow-{s:03d}.npy"), allow_pickle=False)
                       for s in range(len(keep))])
    metrics, _ = score_shadows(logits, labels, keep)
    acc = np.array([membership_accuracy(logits[s], labels, keep[s]) for s in range(len(keep))])
    return {"shadow_set": path, "num_shadows": int(len(keep)), "num_candidates": int(len(labels)),
            "accuracy_in": float(acc[:, 0].mean()), "accuracy_out": float(acc[:, 1].mean()),
            "variants": {k: {m: v[m] for m in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")}
                         for k, v in metrics.items()}}


def main() -> None:
    import numpy as np
    import torch

    from synthset.config import load_config
    from synthset.data.splits import to_unit_tensor
    from synthset.eval.lira import keep_matrix
    from synthset.eval.membership import (draw_candidates, membership_accuracy, score_shadows, shadow_seed,
                                          shadow_train_index)
    from synthset.eval.shadow_training import classifier_shadow_logits
    from synthset.stages.prepare import load_splits
    from synthset.stages.privacy import candidate_pool

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "conf", "privacy.yaml"))
    parser.add_argument("--private", type=int, default=None, help="data.splits.private (pool incl. holdout)")
    parser.add_argument("--holdout", type=int, default=None, help="data.splits.holdout")
    parser.add_argument("--num-shadows", type=int, default=8)
    parser.add_argument("--recipe", action="append", default=[], help="teacher overrides, e.g. epochs=40,augment=false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "privacy-recipe"))
    parser.add_argument("--set", action="append", default=[], help="further config overrides")
    parser.add_argument("--shadow-set", default=None, help="score this stored shadow set; train nothing")
    args = parser.parse_args()
    if args.shadow_set:
        print(json.dumps(score_shadow_set(args.shadow_set)))
        return
    sets = [f"output.root={args.out}", *args.set]
    if args.private is not None:
        sets.append(f"data.splits.private={args.private}")
    if args.holdout is not None:
        sets.append(f"data.splits.holdout={args.holdout}")
    cfg = load_config(args.config, sets)
    torch.set_num_threads(args.threads)
    privacy = cfg.privacy.model_copy(update={"num_shadows": args.num_shadows, "num_candidates": None})
    images, labels, num_private, names = candidate_pool(cfg)
    x_all, y_all = to_unit_tensor(images), torch.from_numpy(labels)
    candidates = draw_candidates(num_private, privacy, len(labels) - num_private)
    keep = keep_matrix(privacy.num_shadows, len(candidates), privacy.seed)
    test = load_splits(cfg).test
    t_idx = np.random.default_rng(0).choice(len(test.labels), min(2000, len(test.labels)), replace=False)
    x_test = to_unit_tensor(test.read(t_idx, cfg.data.image_size))
    y_test = test.labels[t_idx]
    results = []
    for text in args.recipe or [""]:
        recipe = cfg.teacher.model_copy(update=parse_recipe(text))
        recipe = type(recipe).model_validate(recipe.model_dump())
        t0 = time.time()
        logits, test_acc = [], []
        for s in range(privacy.num_shadows):
            idx = shadow_train_index(num_private, candidates, keep[s])
            x_query = torch.cat([x_all[candidates], x_test])
            out = classifier_shadow_logits(recipe, len(names), x_all[idx], y_all[idx], x_query,
                                           shadow_seed(privacy.seed, s), privacy.query_shift, privacy.query_flip,
                                           f"{text or 'default'}-{s}")
            logits.append(out[:len(candidates)])
            test_acc.append(float((out[len(candidates):, 0].argmax(-1) == y_test).mean()))
        logits = np.stack(logits)
        metrics, _ = score_shadows(logits, labels[candidates], keep)
        acc = np.array([membership_accuracy(logits[s], labels[candidates], keep[s]) for s in range(len(logits))])
        row = {"recipe": text or "default", "teacher": recipe.model_dump(mode="json", include={
                   "arch", "width", "epochs", "batch_size", "lr", "weight_decay", "augment"}),
               "private_train": int(num_private), "holdout": int(len(labels) - num_private),
               "train_images_per_model": int(len(shadow_train_index(num_private, candidates, keep[0]))),
               "num_shadows": privacy.num_shadows, "num_candidates": int(len(candidates)),
               "accuracy_in": float(acc[:, 0].mean()), "accuracy_out": float(acc[:, 1].mean()),
               "test_accuracy": float(np.mean(test_acc)), "test_accuracy_se": float(np.std(test_acc, ddof=1) /
                                                                                        np.sqrt(len(test_acc))),
               "seconds_per_model": (time.time() - t0) / privacy.num_shadows,
               "variants": {k: {m: v[m] for m in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")}
                            for k, v in metrics.items()}}
        print(json.dumps(row), flush=True)
        results.append(row)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "recipes.json"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
