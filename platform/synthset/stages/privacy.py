"""Membership inference (LiRA) stage: shadow models as Ray tasks around plain training functions.

Candidates and shadows. A *candidate set* is drawn (seeded) from the private data (``draw_candidates``).
With ``data.splits.holdout > 0`` (the measurement set-up) it is half holdout images — private images
nothing trains on, so OUT of every target — and half images of the private training split — IN the
Teacher and, through its labels, in the Students. Candidates index the *pool* = private training
split followed by the holdout (``candidate_pool``). ``keep_matrix`` assigns every candidate IN to
exactly half of ``privacy.num_shadows`` models; shadow s trains on (private training split minus the
IN candidates) ∪ {candidates IN for s} with its own seed. Each model's logits on every candidate under
the query augmentations (identity, ±``query_shift`` pixel shifts in x and y, optionally horizontal
flips) are cached as ``<set>/shadows/shadow-NNN.npy`` (+ ``.json`` written last): a rerun skips
finished shadows, so every shadow set resumes per shadow.

Shadow modes (``privacy.shadow_modes``), one shadow set each (``shadow_dir``: cached per mode and hash):

* ``classifier`` (``train_shadow_classifier``): the Teacher's recipe (epochs, lr, augmentation) on the
  real half, with the *target's* architecture (arch/width/pretrained) — TCKR's notebook attacks a
  Student with shadows of the Student architecture trained on real data. When Student and Teacher
  share the architecture, Teacher and Students share one set.
* ``pipeline`` (``train_shadow_pipeline``), Students only: per half, the Teacher recipe on the half →
  re-label the Student's synthetic training set with that shadow Teacher → the Student recipe on it
  (soft labels; for hard labels the Teacher does not enter, only the Student's training is repeated).
  This is the faithful attack when the generator does not read the private data (ClassPrompt). For a
  LoRA method (TCKR, DataDream, LoFT) the generator itself was adapted to the private data, and the
  faithful attack would also re-adapt and re-generate per half (``pipeline.run_generation`` on a
  config whose private split is the half): the re-labelling version here measures the leakage through
  the Teacher's labels only.

Targets (``run_lira``): the pipeline's Teacher and every Student, queried on the same candidates,
scored by ``score_target`` (online: IN and OUT Gaussians, offline: OUT only; each with per-example and
with one global variance), ROC curves of all targets on one log-log plot. TCKR (seed 000) reports LiRA
AUC for Teacher and Student without fixing the variant, so all four are reported.

Without a holdout every private candidate is a member of the Teacher, so ``run_privacy`` falls back to
the evaluation of Carlini et al. 2022: every shadow is in turn the target, scored against the other
S − 1 (``lira_leave_one_out``) — the leakage of *the Teacher's recipe* on this private data.

Outputs of a shadow set under ``<output.root>/privacy/<mode>/<hash>/``: ``candidates.json`` (pool
indices, labels, membership), ``keep.npy``, ``shadows/``; of ``run_privacy`` also ``metrics.json``,
``roc_loglog.png`` and ``_SUCCESS.json``.
"""

from __future__ import annotations

import functools
import io
import math
import time
from typing import Callable

import numpy as np

from synthset import storage
from synthset.config import ClassifierConfig, Config, PrivacyConfig, config_hash
from synthset.eval.lira import (keep_matrix, lira_leave_one_out, lira_offline, lira_online, lira_statistic,
                                plot_roc_loglog, roc_curve, roc_metrics)
from synthset.stages.common import StageDir, output_root

__all__ = ["PrivacyConfig", "run_privacy", "run_lira", "score_target", "shadow_dir", "privacy_dir"]

# Fields that change how shadows run, or which sets exist, not what a shadow computes: left out of
# the hash. Data fields that do not change the private images (where files come from, the public
# shift, captions) are left out too, so e.g. a new caption setting does not retrain the shadows.
EXECUTION_ONLY = {"privacy": ("cpus_per_shadow", "gpus_per_shadow", "enabled", "shadow_modes", "pipeline_labels"),
                  "teacher": ("in_memory_limit", "num_workers", "cpus_per_worker", "use_gpu"),
                  "data": ("root", "download", "public_shift", "public_classes", "caption")}
# The fields of a classifier recipe that are the target's architecture (the rest is the training recipe).
ARCH_FIELDS = ("arch", "width", "pretrained")

# A shadow: (cfg, privacy, train_index, query_index, shadow_id, seed) → logits (N, A, C) of a model
# trained on pool[train_index], queried on the augmented views of pool[query_index].
ShadowTrainer = Callable[[Config, PrivacyConfig, np.ndarray, np.ndarray, int, int], np.ndarray]


def shadow_recipe(cfg: Config, target: ClassifierConfig | None = None) -> ClassifierConfig:
    """The ``classifier`` shadows' recipe: the Teacher's, with the target's architecture fields."""
    if target is None:
        return cfg.teacher
    return cfg.teacher.model_copy(update={k: getattr(target, k) for k in ARCH_FIELDS})


def shadow_dir(cfg: Config, privacy: PrivacyConfig, mode: str = "classifier", extra=None) -> StageDir:
    """``<output.root>/privacy/<mode>/<hash>``: the hash covers the private data, ``cfg.teacher`` (the
    shadow recipe), ``privacy`` and ``extra`` (a pipeline set's Student recipe, labels and dataset)."""
    d = cfg.to_dict()
    parts = {"data": d["data"], "teacher": d["teacher"], "privacy": privacy.model_dump(mode="json")}
    for section, keys in EXECUTION_ONLY.items():
        parts[section] = {k: v for k, v in parts[section].items() if k not in keys}
    if parts["data"]["splits"].get("holdout") == 0:
        parts["data"]["splits"].pop("holdout")
    h = config_hash({"stage": "privacy", "mode": mode, "inputs": parts, "extra": extra})
    return StageDir("privacy", h, storage.join(output_root(cfg), "privacy", mode, h))


def privacy_dir(cfg: Config, privacy: PrivacyConfig) -> StageDir:
    """The ``classifier`` shadow set of the Teacher's recipe (``run_privacy``)."""
    return shadow_dir(cfg, privacy, "classifier")


def candidate_pool(cfg: Config) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """(uint8 images (P, S, S) at data.image_size, labels (P,), num_private, class names) of the pool.

    Pool = the private training split, then the holdout (if any): index i < num_private is
    ``splits.private[i]``, the others ``splits.holdout[i − num_private]``.
    """
    from synthset.data.splits import fit_images, make_splits

    splits = make_splits(cfg.data)
    parts = [splits.private] + ([splits.holdout] if splits.holdout is not None else [])
    images = np.concatenate([fit_images(p.images, cfg.data.image_size) for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    return images, labels, len(splits.private), splits.class_names


def shadow_seed(seed: int, shadow_id: int) -> int:
    """Each shadow's training seed derives from (privacy.seed, shadow index) only."""
    return int(np.random.SeedSequence([seed, shadow_id]).generate_state(1)[0] % (2 ** 31))


def draw_candidates(num_private: int, privacy: PrivacyConfig, num_holdout: int = 0) -> np.ndarray:
    """Sorted pool indices of the candidates.

    Without a holdout: ``num_candidates`` private indices (all of them when None). With one: half
    from the holdout (pool indices >= ``num_private``, the non-members) and half from the private
    training split, each drawn without replacement; None means 2 × ``num_holdout``.
    """
    n = privacy.num_candidates
    rng = np.random.default_rng([privacy.seed, 1])
    if num_holdout == 0:
        if n is None:
            return np.arange(num_private)
        if n > num_private:
            raise ValueError(f"privacy.num_candidates: {n} exceeds the {num_private} images of the private split")
        return np.sort(rng.choice(num_private, n, replace=False))
    n = 2 * num_holdout if n is None else n
    if n % 2 or n // 2 > num_holdout or n // 2 > num_private:
        raise ValueError(f"privacy.num_candidates: {n} must be even, with half ({n // 2}) at most the holdout "
                         f"({num_holdout}) and the private training split ({num_private})")
    out = num_private + rng.choice(num_holdout, n // 2, replace=False)
    inn = rng.choice(num_private, n // 2, replace=False)
    return np.sort(np.concatenate([inn, out]))


def shadow_train_index(num_private: int, candidates: np.ndarray, keep_row: np.ndarray) -> np.ndarray:
    """Private indices a shadow trains on: D_rest (non-candidates) plus its IN candidates."""
    rest = np.setdiff1d(np.arange(num_private), candidates)
    return np.sort(np.concatenate([rest, candidates[keep_row]]))


def query_views(x, shift: int, flip: bool):
    """Augmented queries of images (N, C, H, W) in [-1, 1] → (N, A, C, H, W).

    Views: identity, then shifts by (+s, 0), (−s, 0), (0, +s), (0, −s) pixels (padding −1 = black,
    as ``random_shift`` in training) when ``shift`` > 0; with ``flip``, the horizontal flip of every
    view follows (A doubles). LiRA queries each candidate under the training augmentations (its multi-query variant).
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"shift: must be >= 0 (got {shift})")
    views = [x]
    if shift:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        for dy, dx in ((0, shift), (0, -shift), (shift, 0), (-shift, 0)):
            views.append(padded[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w])
    if flip:
        views += [v.flip(-1) for v in views]
    return torch.stack(views, dim=1)


def query_logits(model, x, shift: int, flip: bool, batch_size: int = 512) -> np.ndarray:
    """float32 logits (N, A, C) of ``model`` on ``query_views(x, shift, flip)``."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            v = query_views(x[i:i + batch_size], shift, flip)
            n, a = v.shape[:2]
            out.append(model(v.flatten(0, 1).to(device)).float().cpu().reshape(n, a, -1))
    return torch.cat(out).numpy()


def _fit(ccfg: ClassifierConfig, num_classes: int, x, y, seed: int, name: str, soft=None, temperature: float = 1.0,
         device: str = "cpu"):
    """Build ``ccfg``'s architecture with ``seed`` and train it with its recipe (plain function)."""
    from synthset.models.classifiers import build_classifier
    from synthset.models.training import array_batches, fit_classifier

    ccfg = ccfg.model_copy(update={"seed": seed})
    model = build_classifier(ccfg, num_classes, in_channels=x.shape[1]).to(device)
    steps = math.ceil(len(x) / ccfg.batch_size)
    fit_classifier(model, lambda epoch: array_batches(x, y, ccfg.batch_size, seed, epoch, soft), ccfg.epochs, steps,
                   ccfg.lr, ccfg.weight_decay, soft=soft is not None, temperature=temperature,
                   augment=ccfg.augment, seed=seed, name=name)
    return model


def _device(privacy: PrivacyConfig) -> str:
    import torch

    return "cuda" if privacy.gpus_per_shadow > 0 and torch.cuda.is_available() else "cpu"


def train_shadow_classifier(cfg: Config, privacy: PrivacyConfig, train_index: np.ndarray,
                            query_index: np.ndarray, shadow_id: int, seed: int) -> np.ndarray:
    """The ``classifier`` shadow: ``cfg.teacher``'s recipe on pool[train_index]; logits on the queries.

    Plain function (no Ray): builds ``cfg.teacher``'s architecture with ``seed``, trains it with
    ``fit_classifier`` (hard labels, the Teacher's epochs/lr/augmentation) and returns float32
    logits (len(query_index), A, C) on the augmented views of pool[query_index].
    """
    import torch

    from synthset.data.splits import to_unit_tensor

    images, labels, _, names = candidate_pool(cfg)
    x_all, y_all = to_unit_tensor(images), torch.from_numpy(labels)
    model = _fit(cfg.teacher, len(names), x_all[train_index], y_all[train_index], seed, f"shadow-{shadow_id:03d}",
                 device=_device(privacy))
    return query_logits(model, x_all[query_index], privacy.query_shift, privacy.query_flip)


def dataset_tensors(dataset: str, image_size: int):
    """A labelled synthetic dataset in memory: (images (M, 1, S, S) in [-1, 1], classes (M,))."""
    import torch

    from synthset.data.shards import ShardDataset

    items = list(ShardDataset(dataset, image_size=image_size, channels=1))
    if not items:
        raise ValueError(f"{dataset}: no samples")
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])


def train_shadow_pipeline(cfg: Config, privacy: PrivacyConfig, train_index: np.ndarray, query_index: np.ndarray,
                          shadow_id: int, seed: int, *, dataset: str, labels: str) -> np.ndarray:
    """The ``pipeline`` shadow of a Student: the pipeline downstream of generation, repeated on a half.

    soft labels: the Teacher recipe (``cfg.teacher``) on pool[train_index] → its probabilities on every
    image of the synthetic ``dataset`` (the Student's training set) → the Student recipe
    (``cfg.student``, distillation at its temperature) on them. hard labels: the classes the images
    were generated for, which no Teacher reads, so only the Student's training is repeated (with the
    shadow's seed). Returns the shadow Student's logits (len(query_index), A, C) on the queries.
    ``functools.partial(train_shadow_pipeline, dataset=..., labels=...)`` is a ``ShadowTrainer``.
    """
    import torch

    from synthset.data.splits import to_unit_tensor
    from synthset.models.training import predict_proba

    images, pool_labels, _, names = candidate_pool(cfg)
    x_all, y_all = to_unit_tensor(images), torch.from_numpy(pool_labels)
    device = _device(privacy)
    xs, ys = dataset_tensors(dataset, cfg.data.image_size)
    soft = None
    if labels == "soft":
        teacher = _fit(cfg.teacher, len(names), x_all[train_index], y_all[train_index], seed,
                       f"shadow-{shadow_id:03d}-teacher", device=device)
        soft = torch.from_numpy(predict_proba(teacher, xs, cfg.label.batch_size))
    elif labels != "hard":
        raise ValueError(f"labels: must be 'soft' or 'hard' (got {labels!r})")
    student_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0] % (2 ** 31))
    student = _fit(cfg.student, len(names), xs, ys, student_seed, f"shadow-{shadow_id:03d}-student-{labels}", soft,
                   cfg.student.temperature, device)
    return query_logits(student, x_all[query_index], privacy.query_shift, privacy.query_flip)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def run_shadow(stage_uri: str, cfg_dict: dict, privacy_dict: dict, shadow_id: int,
               train_shadow: ShadowTrainer = train_shadow_classifier) -> dict:
    """Train shadow ``shadow_id`` unless its files exist; write ``shadow-NNN.npy`` then ``.json`` (plain function).

    Reads ``candidates.json`` and ``keep.npy`` from the stage directory, so every shadow (on any
    node) trains on exactly the recorded half.
    """
    import torch

    cfg, privacy = Config.model_validate(cfg_dict), PrivacyConfig.model_validate(privacy_dict)
    name = storage.join(stage_uri, "shadows", f"shadow-{shadow_id:03d}")
    if storage.exists(name + ".json"):
        return {**storage.read_json(name + ".json"), "reused": True}
    torch.set_num_threads(max(1, int(privacy.cpus_per_shadow)))
    cand = storage.read_json(storage.join(stage_uri, "candidates.json"))
    candidates, labels = np.asarray(cand["private_index"]), np.asarray(cand["labels"])
    keep = _load_npy(storage.join(stage_uri, "keep.npy"))
    train_index = shadow_train_index(cand["num_private"], candidates, keep[shadow_id])
    seed = shadow_seed(privacy.seed, shadow_id)
    t0 = time.time()
    logits = train_shadow(cfg, privacy, train_index, candidates, shadow_id, seed)
    if logits.ndim != 3 or logits.shape[0] != len(candidates):
        raise ValueError(f"train_shadow: returned shape {logits.shape}, expected ({len(candidates)}, A, C)")
    storage.write_bytes(name + ".npy", _npy_bytes(logits.astype(np.float32)))
    out = ~keep[shadow_id]
    acc_out = float((logits[out, 0].argmax(-1) == labels[out]).mean())  # accuracy on unseen candidates
    acc_in = float((logits[~out, 0].argmax(-1) == labels[~out]).mean())
    summary = {"shadow": shadow_id, "seed": seed, "train_images": int(len(train_index)),
               "accuracy_in": acc_in, "accuracy_out": acc_out, "seconds": time.time() - t0}
    storage.write_json(name + ".json", summary)
    return summary


def _prepare(stage: StageDir, cfg: Config, privacy: PrivacyConfig) -> None:
    """Write the candidates and the keep matrix once; a resumed run checks they are unchanged."""
    _, labels, num_private, names = candidate_pool(cfg)
    num_holdout = len(labels) - num_private
    candidates = draw_candidates(num_private, privacy, num_holdout)
    keep = keep_matrix(privacy.num_shadows, len(candidates), privacy.seed)
    record = {"num_private": num_private, "num_holdout": num_holdout, "private_index": candidates.tolist(),
              "labels": labels[candidates].tolist(), "is_member": (candidates < num_private).tolist(),
              "class_names": names}
    path = stage.path("candidates.json")
    if storage.exists(path):
        if storage.read_json(path) != record or not np.array_equal(_load_npy(stage.path("keep.npy")), keep):
            raise ValueError(f"{stage.uri}: existing candidates/keep matrix differ from this config's; "
                             "delete the directory to start over")
        return
    storage.makedirs(stage.uri)
    storage.write_bytes(stage.path("keep.npy"), _npy_bytes(keep))
    storage.write_json(path, record)


def variants(per_side: int) -> dict[str, tuple[bool, bool]]:
    """LiRA variants computable with ``per_side`` IN and OUT shadows per candidate: name → (online, fixed_variance).

    Per-example variance needs >= 2 shadows on each side, a global variance >= 1. Leave-one-out
    over S models leaves S/2 − 1 per side (``lira_leave_one_out``); an external target has S/2.
    """
    if per_side < 1:
        raise ValueError(f"num_shadows: too few shadow models ({per_side} per side)")
    out = {"online_fixed_var": (True, True), "offline_fixed_var": (False, True)}
    if per_side >= 2:
        out = {"online": (True, False), **out, "offline": (False, False)}
    return out


def score_shadows(logits: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> tuple[dict, dict]:
    """Leave-one-out LiRA over all models: (metrics per variant, ROC curve per variant). Plain numpy.

    ``logits`` (S, N, A, C), ``labels`` (N,), ``keep`` bool (S, N). Each model is the target once;
    the S × N scores with ground truth ``keep`` give one ROC per variant.
    """
    stats_all = lira_statistic(labels, logits=logits)  # (S, N, A)
    metrics, curves = {}, {}
    for name, (online, fixed) in variants(len(logits) // 2 - 1).items():
        scores = lira_leave_one_out(stats_all, keep, online=online, fixed_variance=fixed)
        metrics[name] = roc_metrics(scores.ravel(), keep.ravel())
        curves[name] = roc_curve(scores.ravel(), keep.ravel())
    return metrics, curves


def score_target(shadow_logits: np.ndarray, keep: np.ndarray, labels: np.ndarray, target_logits: np.ndarray,
                 is_member: np.ndarray) -> tuple[dict, dict]:
    """LiRA on one external target with known membership, all S shadows as reference. Plain numpy.

    ``shadow_logits`` (S, N, A, C) and ``keep`` (S, N) as stored by the stage; ``target_logits``
    (N, A, C) from ``query_logits`` on the same candidates; ``is_member`` (N,) bool. Needs members
    and non-members among the candidates.
    """
    s_stats = lira_statistic(labels, logits=shadow_logits)
    t_stats = lira_statistic(labels, logits=target_logits)
    keep = np.asarray(keep, dtype=bool)
    per_side = int(min(keep.sum(axis=0).min(), (~keep).sum(axis=0).min()))
    metrics, curves = {}, {}
    for name, (online, fixed) in variants(per_side).items():
        score = (lira_online if online else lira_offline)(t_stats, s_stats, keep, fixed_variance=fixed)
        metrics[name] = roc_metrics(score, is_member)
        curves[name] = roc_curve(score, is_member)
    return metrics, curves


def load_shadow_logits(stage: StageDir, num_shadows: int) -> np.ndarray:
    return np.stack([_load_npy(stage.path("shadows", f"shadow-{s:03d}.npy")) for s in range(num_shadows)])


def train_shadow_sets(sets: list[tuple[StageDir, Config, ShadowTrainer]], privacy: PrivacyConfig) -> int:
    """Prepare every shadow set and train all their missing shadows as Ray tasks at once.

    ``sets``: (shadow directory, config whose ``teacher`` is the set's recipe, per-shadow function).
    Finished shadows (``shadow-NNN.json`` present) are skipped. Returns how many were trained now.
    Ray must be initialised (``init_ray``).
    """
    import ray

    task = ray.remote(num_cpus=privacy.cpus_per_shadow, num_gpus=privacy.gpus_per_shadow, max_retries=1)(run_shadow)
    privacy_dict = privacy.model_dump(mode="json")
    pending, todo_total = [], 0
    for stage, cfg, trainer in sets:
        storage.makedirs(stage.uri)
        if not storage.exists(stage.path("config.yaml")):
            stage.begin(cfg)
        _prepare(stage, cfg, privacy)
        todo = [s for s in range(privacy.num_shadows) if not storage.exists(stage.path("shadows", f"shadow-{s:03d}.json"))]
        print(f"[privacy] {stage.uri}: {len(todo)} of {privacy.num_shadows} shadows to train")
        todo_total += len(todo)
        cfg_dict = cfg.to_dict()
        pending += [task.remote(stage.uri, cfg_dict, privacy_dict, s, trainer) for s in todo]
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        info = ray.get(ready[0])
        done += 1
        print(f"[privacy] shadow {info['shadow']:03d} done ({done}/{todo_total}): accuracy IN {info['accuracy_in']:.3f} "
              f"OUT {info['accuracy_out']:.3f}, {info['seconds']:.0f}s")
    return todo_total


def run_privacy(cfg: Config, privacy: PrivacyConfig | None = None, tracker=None,
                train_shadow: ShadowTrainer = train_shadow_classifier) -> dict:
    """Leave-one-out LiRA over the shadows of the Teacher's recipe: metrics and the ROC plot.

    ``privacy`` defaults to ``cfg.privacy``. ``train_shadow`` is the per-shadow function. Ray must be
    initialised (``init_ray``). This is the evaluation without known non-members of the real
    Teacher (``data.splits.holdout: 0``); with a holdout use ``run_lira``.
    """
    privacy = cfg.privacy if privacy is None else privacy
    stage = privacy_dir(cfg, privacy)
    if stage.is_complete():
        return stage.reuse(stage.uri)
    t0 = time.time()
    stage.begin(cfg)
    storage.write_json(stage.path("privacy.json"), privacy.model_dump(mode="json"))
    trained = train_shadow_sets([(stage, cfg, train_shadow)], privacy)
    cand = storage.read_json(stage.path("candidates.json"))
    keep = _load_npy(stage.path("keep.npy"))
    logits = load_shadow_logits(stage, privacy.num_shadows)
    metrics, curves = score_shadows(logits, np.asarray(cand["labels"]), keep)
    shadows = [storage.read_json(stage.path("shadows", f"shadow-{s:03d}.json")) for s in range(privacy.num_shadows)]
    result = {"target": "leave-one-out over the shadows (the Teacher's recipe)", "shadow_mode": "classifier",
              "num_shadows": privacy.num_shadows, "num_candidates": len(cand["labels"]),
              "queries_per_candidate": int(logits.shape[2]), "variants": metrics,
              "shadow_accuracy_in": float(np.mean([s["accuracy_in"] for s in shadows])),
              "shadow_accuracy_out": float(np.mean([s["accuracy_out"] for s in shadows]))}
    storage.write_json(stage.path("metrics.json"), result)
    plot = stage.path("roc_loglog.png")
    if storage.is_local(plot):
        plot_roc_loglog(curves, storage.local_path(plot), f"LiRA, Teacher recipe ({privacy.num_shadows} models)")
    flat = {f"lira_{v}_{k}": m[k] for v, m in metrics.items() for k in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")}
    summary = stage.complete({"metrics": stage.path("metrics.json"), "roc_plot": plot, "seconds": time.time() - t0,
                              "shadows_trained_now": trained, **flat})
    best = metrics.get("online", metrics["online_fixed_var"])
    print(f"[privacy] LiRA AUC {best['auc']:.3f}, TPR@0.1%FPR {best['tpr_at_0.001_fpr']:.4f}, "
          f"TPR@1%FPR {best['tpr_at_0.01_fpr']:.4f} ({time.time() - t0:.0f}s)")
    if tracker is not None:
        tracker.log_stage("privacy", cfg, metrics=flat, params=privacy.model_dump(mode="json"),
                          artifacts=[storage.local_path(plot), storage.local_path(stage.path("metrics.json"))]
                          if storage.is_local(plot) else [])
    return summary


def target_shadow_sets(cfg: Config, targets: dict[str, dict]) -> dict[str, tuple[StageDir, Config, ShadowTrainer]]:
    """Which shadow set attacks which target: name → (shadow dir, recipe config, per-shadow function).

    ``targets``: name → {"recipe": ClassifierConfig of the target, "labels": "soft"/"hard" (Students),
    "dataset": the Student's synthetic training set (Students)}. Names: ``teacher`` and
    ``student-<labels>/<mode>`` for every mode in ``privacy.shadow_modes``.
    """
    privacy, out = cfg.privacy, {}
    for name, t in targets.items():
        modes = ["classifier"] if "labels" not in t else [
            m for m in privacy.shadow_modes if m == "classifier" or t["labels"] in privacy.pipeline_labels]
        for mode in modes:
            key = name if "labels" not in t else f"{name}/{mode}"
            if mode == "classifier":
                sub = cfg.model_copy(update={"teacher": shadow_recipe(cfg, t["recipe"])})
                out[key] = (shadow_dir(sub, privacy, "classifier"), sub, train_shadow_classifier)
            else:
                from synthset.data.shards import read_manifest

                manifest = read_manifest(t["dataset"])
                extra = {"student": cfg.student.model_dump(mode="json", exclude={"in_memory_limit", "num_workers",
                                                                                 "cpus_per_worker", "use_gpu"}),
                         "labels": t["labels"], "label_batch": cfg.label.batch_size,
                         "dataset": [manifest.get("config_hash"), manifest["num_samples"],
                                     [s["sha256"] for s in manifest["shards"]]]}
                trainer = functools.partial(train_shadow_pipeline, dataset=t["dataset"], labels=t["labels"])
                out[key] = (shadow_dir(cfg, privacy, f"pipeline-{t['labels']}", extra), cfg, trainer)
    return out


def run_lira(cfg: Config, targets: dict[str, dict], out_dir: str) -> dict:
    """LiRA against the pipeline's own models, with the holdout as known non-members.

    ``targets``: name → {"model": saved classifier directory, "recipe": its ClassifierConfig, and for
    Students "labels" and "dataset"} (see ``target_shadow_sets``). Trains the missing shadows (Ray),
    queries every target on the candidates, scores it with ``score_target`` and writes
    ``lira.json`` and ``roc_loglog.png`` (online, per-example variance; all targets on one log-log
    plot) and ``roc_loglog_offline.png`` into ``out_dir``. Returns the per-target metrics.
    """
    from synthset.data.splits import to_unit_tensor
    from synthset.models.classifiers import load_classifier

    privacy = cfg.privacy
    if cfg.data.splits.holdout == 0:
        raise ValueError("privacy.enabled: LiRA on the pipeline's own models needs known non-members; set "
                         "data.splits.holdout > 0 (or run run_privacy's leave-one-out evaluation)")
    t0 = time.time()
    sets = target_shadow_sets(cfg, targets)
    unique = {stage.uri: (stage, c, tr) for stage, c, tr in sets.values()}
    trained = train_shadow_sets(list(unique.values()), privacy)
    images, _, _, _ = candidate_pool(cfg)
    x_all = to_unit_tensor(images)
    results, online_curves, offline_curves = {}, {}, {}
    loaded: dict[str, np.ndarray] = {}
    for key, (stage, _, _) in sets.items():
        cand = storage.read_json(stage.path("candidates.json"))
        keep = _load_npy(stage.path("keep.npy"))
        labels, member = np.asarray(cand["labels"]), np.asarray(cand["is_member"])
        model_dir = targets[key.split("/")[0]]["model"]
        if model_dir not in loaded:
            model = load_classifier(storage.materialize(model_dir))
            loaded[model_dir] = query_logits(model, x_all[np.asarray(cand["private_index"])], privacy.query_shift,
                                             privacy.query_flip)
        shadows = load_shadow_logits(stage, privacy.num_shadows)
        metrics, curves = score_target(shadows, keep, labels, loaded[model_dir], member)
        info = [storage.read_json(stage.path("shadows", f"shadow-{s:03d}.json")) for s in range(privacy.num_shadows)]
        results[key] = {"shadow_set": stage.uri, "shadow_mode": stage.uri.split("/")[-2], "variants": metrics,
                        "shadow_accuracy_in": float(np.mean([i["accuracy_in"] for i in info])),
                        "shadow_accuracy_out": float(np.mean([i["accuracy_out"] for i in info])),
                        "target_accuracy_in": float((loaded[model_dir][member, 0].argmax(-1) == labels[member]).mean()),
                        "target_accuracy_out": float((loaded[model_dir][~member, 0].argmax(-1)
                                                      == labels[~member]).mean())}
        online_curves[key] = curves.get("online", curves["online_fixed_var"])
        offline_curves[key] = curves.get("offline", curves["offline_fixed_var"])
    summary = {"num_shadows": privacy.num_shadows, "num_candidates": int(len(labels)), "members": int(member.sum()),
               "queries_per_candidate": int(next(iter(loaded.values())).shape[1]), "targets": results,
               "shadows_trained_now": trained, "seconds": time.time() - t0}
    storage.write_json(storage.join(out_dir, "lira.json"), summary)
    if storage.is_local(out_dir):
        plot_roc_loglog(online_curves, storage.local_path(storage.join(out_dir, "roc_loglog.png")),
                        f"LiRA online, {privacy.num_shadows} shadows")
        plot_roc_loglog(offline_curves, storage.local_path(storage.join(out_dir, "roc_loglog_offline.png")),
                        f"LiRA offline, {privacy.num_shadows} shadows")
    for key, r in results.items():
        v = r["variants"].get("online", r["variants"]["online_fixed_var"])
        print(f"[privacy] {key}: LiRA online AUC {v['auc']:.3f}, TPR@0.1%FPR {v['tpr_at_0.001_fpr']:.4f}")
    return summary


def train_classifier_shadows(cfg: Config) -> dict:
    """Train (or resume) the ``classifier`` shadow sets of the Teacher and the Student architectures.

    They need only the private data, so they can run before, or beside, generation. With
    ``data.splits.holdout: 0`` this is ``run_privacy``'s leave-one-out evaluation instead.
    """
    if cfg.data.splits.holdout == 0:
        return run_privacy(cfg)
    targets = {"teacher": {"recipe": cfg.teacher}, "student": {"recipe": cfg.student}}
    sets = {shadow_dir(c, cfg.privacy).uri: (shadow_dir(c, cfg.privacy), c, train_shadow_classifier)
            for c in (cfg.model_copy(update={"teacher": shadow_recipe(cfg, t["recipe"])}) for t in targets.values())}
    trained = train_shadow_sets(list(sets.values()), cfg.privacy)
    out = {"shadow_sets": list(sets), "shadows_trained_now": trained}
    from synthset.stages.classifier import teacher_dir

    teacher = teacher_dir(cfg)
    if teacher.is_complete():  # the Teacher needs no synthetic data: score it now
        lira_dir = storage.join(output_root(cfg), "privacy", "teacher", teacher.hash)
        result = run_lira(cfg, {"teacher": {"model": teacher.summary()["model"], "recipe": cfg.teacher}}, lira_dir)
        out["teacher_lira"] = {"dir": lira_dir, **{v: {k: m[k] for k in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr")}
                                                   for v, m in result["targets"]["teacher"]["variants"].items()}}
    return out
