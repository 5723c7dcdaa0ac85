"""Membership inference (LiRA) stage: shadow models as Ray tasks, cached and resumed per shadow.

The experiment is plain code elsewhere: candidates, training halves, queries and scoring in
``eval/membership.py``, the attack in ``eval/lira.py``, the shadow trainers on in-memory tensors in
``eval/shadow_training.py``. This module loads their inputs from the config and the stored
artifacts, fans the shadows out as Ray tasks and records every result on storage.

A *shadow set* (``ShadowSet``) lives under ``<output.root>/privacy/<mode>/<hash>/`` (``shadow_dir``):
``candidates.json`` (pool indices, labels, membership; ``candidate_record``) and ``keep.npy`` (the
balanced keep matrix), written once by ``prepare_shadow_set``, then per shadow
``shadows/shadow-NNN.npy`` (its logits on every candidate under every query view) and ``.json``
(written last). A rerun trains only the shadows without a ``.json``, so every set resumes per shadow.

Shadow modes (``privacy.shadow_modes``), one shadow set each:

* ``classifier`` (``train_shadow_classifier``): the Teacher's recipe on the real half, with the
  *target's* architecture (``shadow_recipe``) — TCKR's notebook attacks a Student with shadows of
  the Student architecture trained on real data. When Student and Teacher share the architecture,
  Teacher and Students share one set.
* ``pipeline``, Students only: per half, the pipeline from the private data to the Student, as far as
  it reads the private data; what it repeats of generation is ``privacy.pipeline_generation``
  (``config.pipeline_generation``; ``auto`` picks by the method):

  - ``relabel`` (``train_shadow_pipeline``; set ``pipeline-<labels>``): the Teacher recipe on the half →
    re-label the Student's own synthetic training set with that shadow Teacher → the Student recipe on
    it (soft labels; for hard labels only the Student's training is repeated). The faithful attack when
    the generator never reads the private data (ClassPrompt, ``auto``'s choice for methods without LoRAs).
  - ``regenerate`` (``train_shadow_regenerate``; set ``pipeline-regenerate-<labels>``): a LoRA method
    (TCKR, DataDream, LoFT) adapted its generator to the private data, so the shadow first re-adapts
    the LoRAs on the half and generates a new set of ``synthesis.images_per_class`` per class from them
    (``stages/shadow_generation.py``), then the Teacher and Student recipes as above: the faithful attack,
    ``auto``'s choice for LoRA methods. It needs the foundation model the adapt stage started from
    (``foundation.path`` or the foundation stage's output), checked before any shadow trains.

Targets (``run_lira``): the pipeline's Teacher and every Student, queried on the same candidates,
scored by ``score_target`` (online: IN and OUT Gaussians, offline: OUT only; each with per-example and
with one global variance), ROC curves of all targets on one log-log plot. TCKR (seed 000) reports LiRA
AUC for Teacher and Student without fixing the variant, so all four are reported.

Without a holdout every private candidate is a member of the Teacher, so ``run_privacy`` falls back to
the evaluation of Carlini et al. 2022: every shadow is in turn the target, scored against the other
S − 1 (``score_shadows``) — the leakage of *the Teacher's recipe* on this private data. Its outputs,
beside the shadow set: ``metrics.json``, ``roc_loglog.png`` and ``_SUCCESS.json``.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from synthset import storage
from synthset.config import ClassifierConfig, Config, PrivacyConfig, stage_hash
from synthset.eval.lira import keep_matrix, plot_roc_loglog
from synthset.eval.membership import (candidate_record, draw_candidates, membership_accuracy,
                                      query_logits, score_shadows, score_target, shadow_seed, shadow_train_index)
from synthset.eval.shadow_training import classifier_shadow_logits, pipeline_shadow_logits, shadow_recipe
from synthset.stages.common import StageDir, output_root

__all__ = ["run_privacy", "run_lira", "train_classifier_shadows", "shadow_dir", "privacy_dir"]

# A shadow: (cfg, privacy, train_index, query_index, shadow_id, seed, pool) → logits (N, A, C) of a model
# trained on pool[train_index], queried on the augmented views of pool[query_index]; ``pool`` is
# ``candidate_pool``'s tuple (None: the trainer reads it).
ShadowTrainer = Callable[..., np.ndarray]


def candidate_pool(cfg: Config) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """(uint8 images (P, S, S) at data.image_size, labels (P,), num_private, class names) of the pool.

    Pool = the private training split, then the holdout (if any): index i < num_private is
    ``splits.private[i]``, the others ``splits.holdout[i − num_private]``.
    """
    from synthset.stages.prepare import load_splits

    splits = load_splits(cfg)
    parts = [splits.private] + ([splits.holdout] if splits.holdout is not None else [])
    images = np.concatenate([p.read(size=cfg.data.image_size) for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    return images, labels, len(splits.private), splits.class_names


def shadow_dir(cfg: Config, privacy: PrivacyConfig, mode: str = "classifier", extra=None) -> StageDir:
    """``<output.root>/privacy/<mode>/<hash>``, hashed by the stages' one policy (``config.stage_hash``).

    A shadow set is the Teacher's recipe (``cfg.teacher``) trained on halves of the private data, so
    its hash is the Teacher stage's (the data and the recipe, less the execution-only fields), with
    the fields of ``privacy`` that change a shadow (``PrivacyConfig.shadow_inputs``), the mode and
    ``extra`` (a pipeline set's Student and dataset) as the stage's extra. The targets' training seeds are
    left out (``without_training_seeds``): the shadows of every seed are the same models.
    """
    h = stage_hash(without_training_seeds(cfg), "teacher",
                   extra={"shadows": mode, "privacy": privacy.shadow_inputs(), "extra": extra})
    return StageDir("privacy", h, storage.join(output_root(cfg), "privacy", mode, h))


def without_training_seeds(cfg: Config) -> Config:
    """``cfg`` with ``teacher.seed`` and ``student.seed`` at 0: what names a shadow set.

    A shadow's seed derives from (``privacy.seed``, shadow id) only (``shadow_seed``, ``student_seed``),
    never from the target's training seed, so one shadow set serves the Teacher and Students of every
    training seed (issue 14: figures over seeds with the data split fixed). At seed 0 nothing changes.
    """
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"seed": 0}),
                                  "student": cfg.student.model_copy(update={"seed": 0})})


def privacy_dir(cfg: Config, privacy: PrivacyConfig) -> StageDir:
    """The ``classifier`` shadow set of the Teacher's recipe (``run_privacy``)."""
    return shadow_dir(cfg, privacy, "classifier")


def _device(privacy: PrivacyConfig) -> str:
    import torch

    return "cuda" if privacy.gpus_per_shadow > 0 and torch.cuda.is_available() else "cpu"


def _pool(cfg: Config, pool=None):
    """(uint8 images (P, S, S[, C]), labels (P,), num_private, class names) of the candidate pool: ``pool`` as
    given (a shadow task gets it once from Ray's object store, a zero-copy view), else read from the shards."""
    return pool if pool is not None else candidate_pool(cfg)


def train_shadow_classifier(cfg: Config, privacy: PrivacyConfig, train_index: np.ndarray,
                            query_index: np.ndarray, shadow_id: int, seed: int, pool=None) -> np.ndarray:
    """The ``classifier`` shadow (a ``ShadowTrainer``): ``cfg.teacher``'s recipe on pool[train_index].

    Runs ``classifier_shadow_logits`` on the half as uint8 (float a batch at a time): float32 logits
    (len(query_index), A, C) on the augmented views of pool[query_index].
    """
    import torch

    from synthset.data.splits import to_unit_tensor

    images, labels, _, names = _pool(cfg, pool)
    return classifier_shadow_logits(cfg.teacher, len(names), images[train_index],
                                    torch.from_numpy(labels[train_index]), to_unit_tensor(images[query_index]), seed,
                                    privacy.query_shift, privacy.query_flip, f"shadow-{shadow_id:03d}",
                                    _device(privacy))


def dataset_arrays(dataset: str, image_size: int, channels: int = 1):
    """A labelled synthetic dataset in memory as uint8: (images (M, S, S[, C]) at ``image_size`` in ``channels``,
    classes (M,)) — a byte a pixel; the shadow recipes convert a batch at a time."""
    import torch

    from synthset.data.shards import ShardDataset, fitted_image

    items = [(fitted_image(s["image"], image_size, channels), s["cls"])
             for s in ShardDataset(dataset).samples()]
    if not items:
        raise ValueError(f"{dataset}: no samples")
    return np.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])


def train_shadow_pipeline(cfg: Config, privacy: PrivacyConfig, train_index: np.ndarray, query_index: np.ndarray,
                          shadow_id: int, seed: int, pool=None, *, dataset: str, labels: str) -> np.ndarray:
    """The ``pipeline`` shadow of a Student: the pipeline downstream of generation, repeated on a half.

    Loads the pool and the Student's synthetic training set ``dataset`` and runs
    ``pipeline_shadow_logits`` with ``cfg.teacher``, ``cfg.student`` (at its temperature) and
    ``labels`` ("soft" or "hard"). ``functools.partial(train_shadow_pipeline, dataset=..., labels=...)``
    is a ``ShadowTrainer``.
    """
    import torch

    from synthset.data.splits import to_unit_tensor

    images, pool_labels, _, names = _pool(cfg, pool)
    channels = 1 if images.ndim == 3 else images.shape[-1]
    xs, ys = dataset_arrays(dataset, cfg.data.image_size, channels)
    return pipeline_shadow_logits(cfg.teacher, cfg.student, cfg.student.temperature, len(names),
                                  images[train_index], torch.from_numpy(pool_labels[train_index]), xs, ys,
                                  to_unit_tensor(images[query_index]), labels, seed, privacy.query_shift,
                                  privacy.query_flip, cfg.label.batch_size, f"shadow-{shadow_id:03d}",
                                  _device(privacy))


def train_shadow_regenerate(cfg: Config, privacy: PrivacyConfig, train_index: np.ndarray, query_index: np.ndarray,
                            shadow_id: int, seed: int, pool=None, *, labels: str) -> np.ndarray:
    """The faithful ``pipeline`` shadow of a LoRA method's Student: re-adapt and re-generate on the half.

    ``regenerate_synthetic_set`` adapts ``synthesis.method``'s LoRAs on pool[train_index] and generates
    ``synthesis.images_per_class`` per class (as many as the target Student's set before the replication
    gate) with seeds from ``seed``; ``pipeline_shadow_logits`` then runs the Teacher and Student recipes
    as in ``train_shadow_pipeline``. ``functools.partial(train_shadow_regenerate, labels=...)`` is a
    ``ShadowTrainer``.
    """
    import torch

    from synthset.data.splits import to_unit_tensor
    from synthset.stages.shadow_generation import regenerate_synthetic_set
    from synthset.stages.foundation import foundation_model_path

    images, pool_labels, _, names = _pool(cfg, pool)
    device = _device(privacy)
    xs, ys = regenerate_synthetic_set(cfg, foundation_model_path(cfg), images[train_index], pool_labels[train_index],
                                      names, seed, cfg.synthesis.images_per_class, device)
    return pipeline_shadow_logits(cfg.teacher, cfg.student, cfg.student.temperature, len(names),
                                  images[train_index], torch.from_numpy(pool_labels[train_index]), xs, ys,
                                  to_unit_tensor(images[query_index]), labels, seed, privacy.query_shift,
                                  privacy.query_flip, cfg.label.batch_size, f"shadow-{shadow_id:03d}", device)


def check_regenerate_inputs(cfg: Config) -> None:
    """Before any shadow trains: what ``regenerate`` shadows adapt from exists (the method's LoRAs are checked
    when the config loads). The foundation model is ``foundation.path`` or the foundation stage's output; every
    shadow's half holds ``adapt.shots_per_class`` images of each class (``select_shots`` draws from the half)."""
    from synthset.stages.foundation import check_foundation_path, foundation_dir

    if cfg.foundation.path is not None:
        check_foundation_path(cfg.foundation.path)
    elif not foundation_dir(cfg).is_complete():
        raise ValueError(f"privacy.pipeline_generation: regenerate shadows re-adapt the foundation model, but "
                         f"foundation.path is not set and the foundation stage has no model at "
                         f"{foundation_dir(cfg).uri} (run jobs/pipeline.py first or set foundation.path)")
    _, labels, num_private, names = candidate_pool(cfg)
    privacy, k = cfg.privacy, cfg.adapt.shots_per_class or 1
    candidates = draw_candidates(num_private, privacy, len(labels) - num_private)
    keep = keep_matrix(privacy.num_shadows, len(candidates), privacy.seed)
    for s in range(privacy.num_shadows):
        counts = np.bincount(labels[shadow_train_index(num_private, candidates, keep[s])], minlength=len(names))
        if counts.min() < k:
            raise ValueError(f"adapt.shots_per_class={cfg.adapt.shots_per_class}: regenerate shadows choose the shots "
                             f"from their half of the pool, and shadow {s}'s half has {counts.min()} images of "
                             f"{names[int(counts.argmin())]!r} (lower it or set it to null: every image of the half)")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def run_shadow(stage_uri: str, cfg_dict: dict, privacy_dict: dict, shadow_id: int,
               train_shadow: ShadowTrainer = train_shadow_classifier, pool=None) -> dict:
    """Train shadow ``shadow_id`` unless its files exist; write ``shadow-NNN.npy`` then ``.json`` (a Ray task's body).

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
    logits = train_shadow(cfg, privacy, train_index, candidates, shadow_id, seed, pool)
    if logits.ndim != 3 or logits.shape[0] != len(candidates):
        raise ValueError(f"train_shadow: returned shape {logits.shape}, expected ({len(candidates)}, A, C)")
    storage.write_bytes(name + ".npy", _npy_bytes(logits.astype(np.float32)))
    acc_in, acc_out = membership_accuracy(logits, labels, keep[shadow_id])  # IN: seen in training; OUT: unseen
    summary = {"shadow": shadow_id, "seed": seed, "train_images": int(len(train_index)),
               "accuracy_in": acc_in, "accuracy_out": acc_out, "seconds": time.time() - t0}
    storage.write_json(name + ".json", summary)
    return summary


def prepare_shadow_set(stage: StageDir, cfg: Config, privacy: PrivacyConfig) -> None:
    """Write the candidates and the keep matrix once; a resumed run checks they are unchanged."""
    _, labels, num_private, names = candidate_pool(cfg)
    candidates = draw_candidates(num_private, privacy, len(labels) - num_private)
    keep = keep_matrix(privacy.num_shadows, len(candidates), privacy.seed)
    record = candidate_record(candidates, labels, num_private, names)
    path = stage.path("candidates.json")
    if storage.exists(path):
        if storage.read_json(path) != record or not np.array_equal(_load_npy(stage.path("keep.npy")), keep):
            raise ValueError(f"{stage.uri}: existing candidates/keep matrix differ from this config's; "
                             "delete the directory to start over")
        return
    storage.makedirs(stage.uri)
    storage.write_bytes(stage.path("keep.npy"), _npy_bytes(keep))
    storage.write_json(path, record)


def load_shadow_logits(stage: StageDir, num_shadows: int) -> np.ndarray:
    return np.stack([_load_npy(stage.path("shadows", f"shadow-{s:03d}.npy")) for s in range(num_shadows)])


def _shadow_accuracy(stage: StageDir, num_shadows: int) -> dict:
    info = [storage.read_json(stage.path("shadows", f"shadow-{s:03d}.json")) for s in range(num_shadows)]
    return {"shadow_accuracy_in": float(np.mean([i["accuracy_in"] for i in info])),
            "shadow_accuracy_out": float(np.mean([i["accuracy_out"] for i in info]))}


@dataclass(frozen=True)
class ShadowSet:
    """One set of shadow models: ``mode`` (its directory: classifier, pipeline-<labels> or
    pipeline-regenerate-<labels>), ``stage`` (where it lives), ``cfg`` (whose ``teacher`` is the set's
    recipe) and ``trainer`` (per shadow)."""

    mode: str
    stage: StageDir
    cfg: Config
    trainer: ShadowTrainer


def classifier_shadow_set(cfg: Config, privacy: PrivacyConfig, target: ClassifierConfig | None = None) -> ShadowSet:
    """The ``classifier`` shadows of a target: the Teacher's recipe with ``target``'s architecture."""
    sub = cfg if target is None else cfg.model_copy(update={"teacher": shadow_recipe(cfg.teacher, target)})
    return ShadowSet("classifier", shadow_dir(sub, privacy, "classifier"), sub, train_shadow_classifier)


def train_shadow_sets(sets: list[ShadowSet], privacy: PrivacyConfig) -> int:
    """Prepare every shadow set and train all their missing shadows as Ray tasks at once.

    Finished shadows (``shadow-NNN.json`` present) are skipped. Returns how many were trained now.
    Ray must be initialised (``init_ray``).
    """
    import ray

    task = ray.remote(num_cpus=privacy.cpus_per_shadow, num_gpus=privacy.gpus_per_shadow, max_retries=1)(run_shadow)
    privacy_dict = privacy.model_dump(mode="json")
    pending, todo_total = [], 0
    # The candidate pool (uint8 at data.image_size) goes into Ray's object store once; every shadow task of
    # every set reads it there (zero-copy) instead of decoding the shards again. The sets share the data.
    pool = ray.put(candidate_pool(sets[0].cfg)) if sets else None
    for s in sets:
        storage.makedirs(s.stage.uri)
        if not storage.exists(s.stage.path("config.yaml")):
            s.stage.begin(s.cfg)
        prepare_shadow_set(s.stage, s.cfg, privacy)
        todo = [i for i in range(privacy.num_shadows)
                if not storage.exists(s.stage.path("shadows", f"shadow-{i:03d}.json"))]
        print(f"[privacy] {s.stage.uri}: {len(todo)} of {privacy.num_shadows} shadows to train")
        todo_total += len(todo)
        cfg_dict = s.cfg.to_dict()
        pending += [task.remote(s.stage.uri, cfg_dict, privacy_dict, i, s.trainer, pool) for i in todo]
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
    trained = train_shadow_sets([ShadowSet("classifier", stage, cfg, train_shadow)], privacy)
    cand = storage.read_json(stage.path("candidates.json"))
    keep = _load_npy(stage.path("keep.npy"))
    logits = load_shadow_logits(stage, privacy.num_shadows)
    metrics, curves = score_shadows(logits, np.asarray(cand["labels"]), keep)
    result = {"target": "leave-one-out over the shadows (the Teacher's recipe)", "shadow_mode": "classifier",
              "num_shadows": privacy.num_shadows, "num_candidates": len(cand["labels"]),
              "queries_per_candidate": int(logits.shape[2]), "variants": metrics,
              **_shadow_accuracy(stage, privacy.num_shadows)}
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


@dataclass(frozen=True)
class Attack:
    """One target attacked with one shadow set: ``target`` (a key of ``run_lira``'s ``targets``),
    ``shadow_mode`` (classifier or pipeline), ``labels`` (a Student's label kind; None for the Teacher)."""

    target: str
    shadow_mode: str
    labels: str | None
    shadows: ShadowSet

    @property
    def key(self) -> str:
        """The result's name: ``teacher``, or ``<target>/<shadow_mode>`` for a Student."""
        return self.target if self.labels is None else f"{self.target}/{self.shadow_mode}"


def target_shadow_sets(cfg: Config, targets: dict[str, dict]) -> list[Attack]:
    """Which shadow set attacks which target.

    ``targets``: name → {"recipe": ClassifierConfig of the target, and for Students "labels"
    ("soft"/"hard") and "dataset" (the Student's synthetic training set)}. The Teacher is attacked
    with ``classifier`` shadows; a Student with every mode in ``privacy.shadow_modes`` (``pipeline``
    only for label kinds in ``privacy.pipeline_labels``). A re-labelling pipeline set is named by the
    Student's stage hash and the identity of the dataset it re-labels (manifest hash, size, shard
    sha256s); a regenerating one (``pipeline-regenerate-<labels>``) by the Student's stage hash, which
    holds every setting of adaptation and generation. What regenerating needs is checked here, before
    any shadow trains (and only when a Student is attacked: the Teacher's LiRA runs ahead of generation).
    """
    from synthset.config import pipeline_generation
    from synthset.data.shards import read_manifest

    privacy, out = cfg.privacy, []
    regenerate = pipeline_generation(cfg) == "regenerate"
    for name, t in targets.items():
        labels = t.get("labels")
        modes = ["classifier"] if labels is None else [
            m for m in privacy.shadow_modes if m == "classifier" or labels in privacy.pipeline_labels]
        for mode in modes:
            if mode == "classifier":
                shadows = classifier_shadow_set(cfg, privacy, t["recipe"])
            elif regenerate:
                check_regenerate_inputs(cfg)
                mode_dir = f"pipeline-regenerate-{labels}"
                extra = {"student": stage_hash(without_training_seeds(cfg), "student", labels)}
                trainer = functools.partial(train_shadow_regenerate, labels=labels)
                shadows = ShadowSet(mode_dir, shadow_dir(cfg, privacy, mode_dir, extra), cfg, trainer)
            else:
                manifest = read_manifest(t["dataset"])
                extra = {"student": stage_hash(without_training_seeds(cfg), "student", labels),
                         "dataset": [manifest.get("config_hash"), manifest["num_samples"],
                                     [s["sha256"] for s in manifest["shards"]]]}
                trainer = functools.partial(train_shadow_pipeline, dataset=t["dataset"], labels=labels)
                shadows = ShadowSet(f"pipeline-{labels}", shadow_dir(cfg, privacy, f"pipeline-{labels}", extra), cfg,
                                    trainer)
            out.append(Attack(name, mode, labels, shadows))
    return out


def run_lira(cfg: Config, targets: dict[str, dict], out_dir: str) -> dict:
    """LiRA against the pipeline's own models, with the holdout as known non-members.

    ``targets``: name → {"model": saved classifier directory, "recipe": its ClassifierConfig, and for
    Students "labels" and "dataset"} (see ``target_shadow_sets``). Trains the missing shadows (Ray),
    queries every target once on the candidates, scores it against each of its shadow sets with
    ``score_target`` and writes ``lira.json`` and ``roc_loglog.png`` (online, per-example variance;
    all targets on one log-log plot) and ``roc_loglog_offline.png`` into ``out_dir``. Returns the
    per-target metrics: ``targets[<key>]`` holds ``target``, ``role`` (teacher/student), ``labels``,
    ``shadow_mode``, ``shadow_set``, ``variants`` (metrics per LiRA variant) and accuracies.
    """
    from synthset.data.splits import to_unit_tensor
    from synthset.models.classifiers import load_classifier

    privacy = cfg.privacy
    if cfg.data.splits.holdout == 0:
        raise ValueError("privacy.enabled: LiRA on the pipeline's own models needs known non-members; set "
                         "data.splits.holdout > 0 (or run run_privacy's leave-one-out evaluation)")
    t0 = time.time()
    attacks = target_shadow_sets(cfg, targets)
    sets = list({a.shadows.stage.uri: a.shadows for a in attacks}.values())
    trained = train_shadow_sets(sets, privacy)
    images, pool_labels, num_private, _ = candidate_pool(cfg)
    # Every set recorded these candidates (prepare_shadow_set checks), so each target is queried once.
    candidates = draw_candidates(num_private, privacy, len(pool_labels) - num_private)
    labels, member = pool_labels[candidates], candidates < num_private
    x_query = to_unit_tensor(images[candidates])
    target_logits = {}
    for name in dict.fromkeys(a.target for a in attacks):
        model = load_classifier(storage.materialize(targets[name]["model"]))
        target_logits[name] = query_logits(model, x_query, privacy.query_shift, privacy.query_flip)
    results, online_curves, offline_curves = {}, {}, {}
    for a in attacks:
        stage = a.shadows.stage
        keep = _load_npy(stage.path("keep.npy"))
        metrics, curves = score_target(load_shadow_logits(stage, privacy.num_shadows), keep, labels,
                                       target_logits[a.target], member)
        acc_in, acc_out = membership_accuracy(target_logits[a.target], labels, member)
        results[a.key] = {"target": a.target, "role": "teacher" if a.labels is None else "student",
                          "labels": a.labels, "shadow_set": stage.uri, "shadow_mode": a.shadows.mode,
                          "variants": metrics, **_shadow_accuracy(stage, privacy.num_shadows),
                          "target_accuracy_in": acc_in, "target_accuracy_out": acc_out}
        online_curves[a.key] = curves.get("online", curves["online_fixed_var"])
        offline_curves[a.key] = curves.get("offline", curves["offline_fixed_var"])
    summary = {"num_shadows": privacy.num_shadows, "num_candidates": int(len(labels)), "members": int(member.sum()),
               "queries_per_candidate": int(next(iter(target_logits.values())).shape[1]), "targets": results,
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
    sets = {s.stage.uri: s for s in (classifier_shadow_set(cfg, cfg.privacy, r) for r in (cfg.teacher, cfg.student))}
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
