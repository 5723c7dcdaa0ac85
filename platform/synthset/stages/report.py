"""Re-score the saved Teacher and Students of a config on the real test set."""

from __future__ import annotations

from synthset.config import Config
from synthset.eval.classification import classification_report
from synthset.models.classifiers import load_classifier
from synthset.models.training import predict_split
from synthset.stages.classifier import student_dir, teacher_dir
from synthset import storage


def evaluate_classifiers(cfg: Config) -> dict:
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    stages = {"teacher": teacher_dir(cfg), **{f"student-{l}": student_dir(cfg, l) for l in cfg.student.labels}}
    results = {}
    for name, stage in stages.items():
        if not stage.is_complete():
            results[name] = {"status": f"not trained for this config ({stage.uri})"}
            continue
        model = load_classifier(storage.materialize(stage.uri))
        probs = predict_split(model, splits.test, cfg.data.image_size)
        report = classification_report(splits.test.labels, probs, splits.class_names)
        results[name] = {"accuracy": report["accuracy"], "per_class_accuracy": report["per_class_accuracy"]}
    return results


# --- The per-dataset report and the accuracy-versus-privacy comparison -------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_report(metrics: dict, uri: str, images: dict[str, str] | None = None) -> None:
    """Markdown report of one evaluated synthetic dataset (``stages/evaluate.py``'s ``metrics.json``).

    ``images``: name → file (relative to the report) for ``samples``, ``roc``, ``roc_offline``.
    """
    images = images or {}
    lines = [f"# synthset report: {metrics.get('run')} ({metrics.get('method')}, hash {metrics.get('config_hash')})", "",
             "## Counts", "",
             "| private training images | holdout | synthetic images | cardinality | Student training images |",
             "| --- | --- | --- | --- | --- |",
             f"| {metrics['private_images']} | {metrics.get('holdout_images', 0)} | {metrics['synthetic_images']} | "
             f"{metrics['cardinality']:.2f}× | {metrics['student_training_images']} |", "",
             "Per class: " + ", ".join(f"{k} {v}" for k, v in metrics.get("totals_per_class", {}).items()), "",
             "## Accuracy on the real test set", "", "| model | accuracy |", "| --- | --- |",
             f"| Teacher (real data) | {metrics['teacher_accuracy']:.4f} |"]
    lines += [f"| Student, {k.split('_')[1]} labels (CAS) | {v:.4f} |" for k, v in metrics.items()
              if k.startswith("student_") and k.endswith("_accuracy")]
    lines += ["", f"Teacher agrees with the prompted class on {metrics['teacher_agreement_on_synthetic']:.1%} "
              "of the synthetic images.", ""]
    if "samples" in images:
        lines += ["## Samples per class", "", f"![samples per class]({images['samples']})", ""]
    gen = metrics.get("generative")
    if gen:
        keys = ["fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "recognizability",
                "diversity", "diversity_private"]
        lines += [f"## Generative metrics ({gen['feature_space']} features; {gen['synthetic_images']} synthetic vs "
                  f"{gen['real_images']} private images)", "", "| " + " | ".join(k for k in keys if k in gen) + " |",
                  "| " + " | ".join("---" for k in keys if k in gen) + " |",
                  "| " + " | ".join(_fmt(gen[k]) for k in keys if k in gen) + " |", ""]
    rep = metrics.get("replication")
    if rep:
        lines += ["## Replication gate", "",
                  f"{rep['copies']} of {rep['images']} synthetic images ({rep['copy_fraction']:.3%}) lie within "
                  f"{rep['threshold']:.4f} ({rep['metric']}) of a private training image"
                  + (f" — closer than {1 - rep['quantile']:.0%} of private images are to their own nearest neighbour"
                     if rep.get("quantile") else " (fixed threshold)") + f". Action: {rep['action']} ({rep['dropped']} dropped "
                  f"before the Student). Audit: `{rep['audit']}`.", ""]
    lira = metrics.get("lira")
    if lira:
        lines += [f"## Membership inference (LiRA, {lira['num_shadows']} shadows, {lira['num_candidates']} candidates: "
                  f"{lira['members']} members, {lira['num_candidates'] - lira['members']} holdout non-members; "
                  f"{lira['queries_per_candidate']} queries each)", "",
                  "| target | shadows | variant | AUC | TPR@0.1%FPR | TPR@1%FPR |", "| --- | --- | --- | --- | --- | --- |"]
        for target, r in lira["targets"].items():
            for variant, m in r["variants"].items():
                lines.append(f"| {target.split('/')[0]} | {r['shadow_mode']} | {variant} | {m['auc']:.4f} | "
                             f"{m['tpr_at_0.001_fpr']:.4f} | {m['tpr_at_0.01_fpr']:.4f} |")
        lines.append("")
        for key in ("roc", "roc_offline"):
            if key in images:
                lines += [f"![{key}]({images[key]})", ""]
    loo = metrics.get("lira_leave_one_out")
    if loo:
        lines += ["## Membership inference (LiRA leave-one-out over the Teacher recipe's shadows)", "",
                  "| variant | AUC | TPR@0.1%FPR | TPR@1%FPR |", "| --- | --- | --- | --- |"]
        lines += [f"| {v} | {m['auc']:.4f} | {m['tpr_at_0.001_fpr']:.4f} | {m['tpr_at_0.01_fpr']:.4f} |"
                  for v, m in loo["variants"].items()]
        if "roc" in images:
            lines += ["", f"![roc]({images['roc']})"]
        lines.append("")
    from synthset import storage

    storage.write_bytes(uri, "\n".join(lines).encode())


def tradeoff_rows(metrics_list: list[dict], variant: str = "online") -> list[dict]:
    """One row per (evaluated dataset, target): cardinality, accuracy, LiRA AUC and TPR@0.1% FPR."""
    rows = []
    for m in metrics_list:
        lira = m.get("lira", {}).get("targets", {})
        for target, r in lira.items():
            name = target.split("/")[0]
            acc = m["teacher_accuracy"] if name == "teacher" else m.get(f"student_{name.split('-')[1]}_accuracy")
            v = r["variants"].get(variant) or r["variants"][f"{variant}_fixed_var"]
            rows.append({"run": m.get("run"), "config_hash": m.get("config_hash"), "cardinality": m["cardinality"],
                         "target": target, "accuracy": acc, "auc": v["auc"], "tpr_at_0.001_fpr": v["tpr_at_0.001_fpr"],
                         "replication_rate": m.get("replication", {}).get("copy_fraction")})
    return rows


def save_tradeoff_plot(rows: list[dict], path: str, title: str = "Accuracy versus privacy") -> None:
    """Accuracy (real test set) against LiRA AUC, one marker per (dataset, target), labelled with cardinality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    targets = sorted({r["target"] for r in rows})
    for target in targets:
        sel = sorted([r for r in rows if r["target"] == target], key=lambda r: r["cardinality"])
        for ax, key in zip(axes, ("auc", "tpr_at_0.001_fpr")):
            ax.plot([r[key] for r in sel], [r["accuracy"] for r in sel], marker="o", label=target)
            for r in sel:
                ax.annotate(f"{r['cardinality']:.0f}×" if target != "teacher" else "", (r[key], r["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    from synthset.plots import finish_tradeoff

    finish_tradeoff(fig, axes, "LiRA AUC (online)", "LiRA TPR at 0.1% FPR (online)", "test accuracy", title, path)


def tradeoff_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| run | cardinality | target | accuracy | LiRA AUC | TPR@0.1%FPR | replication rate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["cardinality"], r["target"])):
        rr = r["replication_rate"]
        lines.append(f"| {r['run']} | {r['cardinality']:.1f}× | {r['target']} | {r['accuracy']:.4f} | {r['auc']:.4f} | "
                     f"{r['tpr_at_0.001_fpr']:.4f} | {'' if rr is None else f'{rr:.4%}'} |")
    return "\n".join(lines)
