"""The stages a sweep's trials share, run once before any trial (and skipped on a restore).

Cardinality is a prefix of one generation plan (``methods/plan.py``: image ``index`` has seed
``derive_seed(run.seed, index)``, key ``f"{index:010d}"`` and class ``index % C``, whatever the plan's
size). So trials that differ only in ``synthesis.images_per_class`` share one *generator setting*: its
largest cardinality is generated once (``pipeline.run_generation``, Ray Data actor pools) and labelled
once, and every smaller one is written as the first images of those datasets (``write_prefix_dataset``,
``write_label_prefix``: whole shards copied, the last one cut), under the smaller config's own stage
directories with complete manifests, so the pipeline's stage cache (``config.stage_hash``) finds them
and nothing is generated or labelled again.

Then, once per distinct stage hash: foundation, Teacher, labels of other Teachers, the replication gate,
and with ``privacy.enabled`` the ``classifier`` shadow sets. Trials then only train their Students and
evaluate, and two concurrent trials never write the same stage directory.
"""

from __future__ import annotations

import time

from synthset import storage
from synthset.config import Config, stage_hash


def at_cardinality(cfg: Config, images_per_class: int) -> Config:
    """``cfg`` with ``synthesis.images_per_class`` replaced (validated again)."""
    d = cfg.to_dict()
    d["synthesis"] = {**d["synthesis"], "images_per_class": images_per_class}
    return Config.model_validate(d)


def generator_key(cfg: Config) -> str:
    """What one generation plan depends on: the synthesis stage hash at a fixed cardinality."""
    return stage_hash(at_cardinality(cfg, 1), "synthesis")


def generation_groups(configs: list[Config]) -> dict[str, dict]:
    """generator key → {"config": its largest-cardinality config, "prefixes": the smaller image counts}."""
    groups: dict[str, dict] = {}
    for cfg in configs:
        g = groups.setdefault(generator_key(cfg), {"sizes": set(), "config": cfg})
        g["sizes"].add(cfg.synthesis.images_per_class)
    out = {}
    for key, g in groups.items():
        largest = max(g["sizes"])
        out[key] = {"config": at_cardinality(g["config"], largest), "images_per_class": largest,
                    "prefixes": sorted(g["sizes"] - {largest})}
    return out


def _copy_prefix(source: str, dataset: str, total: int, shard_size: int, image_format: str) -> list[dict]:
    """Write the first ``total`` samples of dataset ``source`` (shards of ``shard_size``) into ``dataset``.

    Shard i of both plans starts at sample i × shard_size: a shard the prefix holds whole is copied byte
    for byte with its stats; the last, shorter one is rewritten from its first samples (with Teacher
    labels, their agreement is counted again). Returns the shards' stats.
    """
    from synthset.data.shards import iter_shard, read_manifest, shard_name, write_shard
    from synthset.methods.plan import shard_ranges

    src = read_manifest(source)
    sizes = [s["count"] for s in src["shards"]]
    if src["num_samples"] < total or any(n != shard_size for n in sizes[:-1]):
        raise ValueError(f"{source}: not a prefix source for {total} samples in shards of {shard_size} "
                         f"(it holds {src['num_samples']} in shards of {sizes[:1]})")
    counts = {s["shard"]: s["count"] for s in src["shards"]}
    stats = []
    for index, start, stop in shard_ranges(total, shard_size):
        name = shard_name(index)
        if counts.get(name) == stop - start:  # the same shard in both plans
            storage.write_bytes(storage.join(dataset, name), storage.read_bytes(storage.join(source, name)))
            shard_stats = storage.read_json(storage.join(source, "_shards", name + ".json"))
            storage.write_json(storage.join(dataset, "_shards", name + ".json"), shard_stats)
        else:  # the prefix ends inside this shard
            keep = [s for s in iter_shard(storage.join(source, name), decode=False) if int(s["key"]) < stop]
            samples = [{"key": s["key"], "image_bytes": s["image"], "cls": s["cls"], "meta": s["meta"],
                        "soft": s.get("soft")} for s in keep]
            extra = {"prefix_of": source}
            if keep and all("soft" in s for s in keep):
                agrees: dict[str, int] = {}
                for s in keep:
                    agrees[str(s["cls"])] = agrees.get(str(s["cls"]), 0) + int(s["soft"].argmax() == s["cls"])
                extra["teacher_agrees"] = agrees
            shard_stats = write_shard(dataset, index, samples, image_format, extra)
        stats.append(shard_stats)
    return stats


def write_prefix_dataset(cfg: Config, source: str, class_names: list[str]) -> dict:
    """Write ``cfg``'s synthesis stage as the first ``images_per_class × C`` images of dataset ``source``.

    ``source`` is a complete synthetic dataset of the same generator setting and shard size with at
    least as many images (``_copy_prefix``). The summary says ``prefix_of`` and ``generated_now: 0``.
    A complete stage is reused.
    """
    from synthset.data.shards import read_manifest, write_manifest
    from synthset.stages.synthesize import synthesis_dir

    stage = synthesis_dir(cfg)
    if stage.is_complete():
        return stage.reuse(stage.path("data"))
    syn, t0 = cfg.synthesis, time.time()
    total = syn.images_per_class * len(class_names)
    src = read_manifest(source)
    stage.begin(cfg)
    dataset = stage.path("data")
    stats = _copy_prefix(source, dataset, total, syn.shard_size, syn.image_format)
    meta = {k: src[k] for k in ("class_names", "method", "generator", "run_seed", "loras") if k in src}
    manifest = write_manifest(dataset, {"config_hash": stage.hash, **meta, "prefix_of": source,
                                        "plan": {"total": total, "shard_size": syn.shard_size}}, stats)
    if manifest["num_samples"] != total:
        raise RuntimeError(f"prefix of {source}: {manifest['num_samples']} samples written, {total} planned")
    seconds = time.time() - t0
    print(f"[synthesis] {total} images as the prefix of {source} ({seconds:.1f}s) → {dataset}")
    return stage.complete({"dataset": dataset, "num_samples": total, "generated_now": 0, "prefix_of": source,
                           "seconds": seconds, "images_per_s": 0.0})


def write_label_prefix(cfg: Config, source: str, synthesis_dataset: str) -> dict:
    """Write ``cfg``'s label stage as the first images of the labelled dataset ``source``.

    The Teacher labels each image on its own, so the labels of a prefix are the prefix of the labels:
    ``source`` is the label stage of the larger cardinality (same Teacher), ``synthesis_dataset`` this
    config's prefix dataset (``write_prefix_dataset``). A complete stage is reused.
    """
    from synthset.data.shards import read_manifest, write_manifest
    from synthset.stages.synthesize import label_dir

    stage = label_dir(cfg)
    if stage.is_complete():
        return stage.reuse(stage.path("data"))
    t0 = time.time()
    src, syn = read_manifest(source), read_manifest(synthesis_dataset)
    total = syn["num_samples"]
    stage.begin(cfg)
    dataset = stage.path("data")
    stats = _copy_prefix(source, dataset, total, cfg.synthesis.shard_size, "png")  # run_label writes PNG
    names = src["class_names"]
    agree = {c: sum(s["teacher_agrees"].get(str(c), 0) for s in stats) for c in range(len(names))}
    totals = {c: sum(s["per_class"].get(str(c), 0) for s in stats) for c in range(len(names))}
    per_class = {names[c]: agree[c] / totals[c] for c in range(len(names)) if totals[c]}
    agreement = sum(agree.values()) / max(1, sum(totals.values()))
    manifest = write_manifest(dataset, {"config_hash": stage.hash, "class_names": names, "method": src["method"],
                                        "generator": src["generator"], "teacher": src["teacher"],
                                        "source": synthesis_dataset, "prefix_of": source,
                                        "teacher_agreement": agreement, "teacher_agreement_per_class": per_class},
                              stats)
    seconds = time.time() - t0
    print(f"[label] {manifest['num_samples']} labelled images as the prefix of {source} ({seconds:.1f}s)")
    return stage.complete({"dataset": dataset, "num_samples": manifest["num_samples"], "teacher_agreement": agreement,
                           "teacher_agreement_per_class": per_class, "prefix_of": source, "seconds": seconds})


def _once(done: dict, key: str, fn, seconds: dict, name: str):
    """``fn()`` the first time ``key`` is seen; the stage's own seconds (0 when reused) go to ``seconds[name]``."""
    if key not in done:
        summary = fn()
        done[key] = summary
        seconds[name] = seconds.get(name, 0.0) + (0.0 if summary.get("reused") else float(summary.get("seconds", 0.0)))
    return done[key]


def run_shared_stages(configs: list[Config], class_names: list[str], tracker=None) -> dict:
    """Run what the trials share (see the module docstring); {"seconds": {stage: s}, "generation": [...]}."""
    from synthset.pipeline import run_generation
    from synthset.stages.classifier import run_teacher
    from synthset.stages.foundation import run_foundation
    from synthset.stages.synthesize import run_label

    seconds: dict[str, float] = {}
    done: dict[str, dict] = {}
    generation = []
    for cfg in configs:
        _once(done, "foundation-" + stage_hash(cfg, "foundation"), lambda: run_foundation(cfg, tracker), seconds,
              "foundation")
        _once(done, "teacher-" + stage_hash(cfg, "teacher"), lambda: run_teacher(cfg, tracker), seconds, "teacher")
    for key, group in generation_groups(configs).items():
        big = group["config"]
        summary = run_generation(big, class_names, True, tracker)
        for stage in ("caption", "adapt"):
            if summary.get(stage) and not summary[stage].get("reused"):
                seconds[stage] = seconds.get(stage, 0.0) + float(summary[stage].get("seconds", 0.0))
        if not summary.get("reused"):
            seconds["synthesis"] = seconds.get("synthesis", 0.0) + float(summary.get("seconds", 0.0))
        teacher = done["teacher-" + stage_hash(big, "teacher")]
        big_label = _once(done, "label-" + stage_hash(big, "label"),
                          lambda: run_label(big, summary["dataset"], teacher["model"], True, tracker), seconds, "label")
        for images_per_class in group["prefixes"]:
            small = at_cardinality(big, images_per_class)
            prefix = write_prefix_dataset(small, summary["dataset"], class_names)
            label = write_label_prefix(small, big_label["dataset"], prefix["dataset"])
            done["label-" + stage_hash(small, "label")] = label
            for s in (prefix, label):
                if not s.get("reused"):
                    seconds["prefix"] = seconds.get("prefix", 0.0) + float(s["seconds"])
        generation.append({"generator_key": key, "dataset": summary["dataset"],
                           "images_per_class": group["images_per_class"], "prefixes": group["prefixes"],
                           "generated_now": 0 if summary.get("reused") else summary.get("generated_now", 0)})
    from synthset.stages.synthesize import synthesis_dir

    for cfg in configs:
        teacher = done["teacher-" + stage_hash(cfg, "teacher")]
        dataset = synthesis_dir(cfg).summary()["dataset"]
        label = _once(done, "label-" + stage_hash(cfg, "label"),
                      lambda: run_label(cfg, dataset, teacher["model"], True, tracker), seconds, "label")
        if cfg.replication.enabled:
            _once(done, "replication-" + stage_hash(cfg, "replication"),
                  lambda: _replication(cfg, label["dataset"], tracker), seconds, "replication")
        if cfg.evaluate.enabled and cfg.privacy.enabled:
            from synthset.stages.privacy import classifier_shadow_set

            key = "shadows-" + "-".join(sorted(classifier_shadow_set(cfg, cfg.privacy, r).stage.hash
                                               for r in (cfg.teacher, cfg.student)))
            _once(done, key, lambda: _shadows(cfg), seconds, "privacy-shadows")
    return {"seconds": seconds, "generation": generation}


def _replication(cfg: Config, labelled: str, tracker) -> dict:
    from synthset.stages.evaluate import replication_dir, student_training_set

    t0 = time.time()
    stage = replication_dir(cfg)
    reused = stage.is_complete()
    student_training_set(cfg, labelled, True, tracker)
    return {"reused": reused, "seconds": time.time() - t0}


def _shadows(cfg: Config) -> dict:
    from synthset.stages.privacy import train_classifier_shadows

    t0 = time.time()
    out = train_classifier_shadows(cfg)
    return {"reused": out.get("shadows_trained_now", 1) == 0, "seconds": time.time() - t0}
