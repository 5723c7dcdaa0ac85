"""The generation graph, declared once: the stages a method may need, and the walk from a config to its shards.

A method (``methods/<name>.py``) names what it needs (captions, embeddings, LoRAs, a generator of its own) and,
optionally, a step after synthesis; each need is met by one stage of ``STAGES``, a declared value:

- ``dir(cfg)``: its ``StageDir`` (hash and output directory) for a config;
- ``run(cfg, foundation model, summaries of the stages before it, resume, tracker) -> summary``;
- ``read(cfg, summary)``: what planning reads of its artifact (``Method.plan_context`` gets these, keyed by
  stage: the caption stage's captions by class, the adapt stage's LoRA table; a summary by default);
- ``upstream(cfg)`` (optional): the config of another generation this stage reads (CASD's pool of
  ``pool.method``), which the walk runs first and hands over as ``done["pool"]``.

``run_generation`` is the one walk from a config to its synthetic shards (stages the method needs → plan →
synthesis → the method's step after it); the pipeline, the sweep and the jobs all call it, and the privacy
shadows run the same stage functions on their halves (``stages/shadow_generation.py``). Adding a stage is
one entry here beside its run function; a method picks it by name (``Method.generator``,
``Method.after_synthesis``).
"""

from __future__ import annotations

from typing import Any

from synthset.config import Config
from synthset.methods import NEEDS, Method, get_method
from synthset.registry import Stage, method_stage
from synthset.stages import adapt, caption, embed, generator, rcdm
from synthset.stages.common import StageDir


def _run_caption(cfg: Config, model: str, done: dict, resume: bool, tracker) -> dict:
    return caption.run_caption(cfg, "private", resume, tracker)


def _run_adapt(cfg: Config, model: str, done: dict, resume: bool, tracker) -> dict:
    captions = done.get("caption")
    return adapt.run_adapt(cfg, model, captions["captions"] if captions else None, resume, tracker)


def _run_embed(cfg: Config, model: str, done: dict, resume: bool, tracker) -> dict:
    return embed.run_embed(cfg, resume, tracker)


def _run_rcdm_generator(cfg: Config, model: str, done: dict, resume: bool, tracker) -> dict:
    return rcdm.run_rcdm_generator(cfg, done["embed"], resume, tracker)


def _run_rcdm_filter(cfg: Config, model: str, done: dict, resume: bool, tracker) -> dict:
    """With ``synthesis.rcdm.filter.enabled``: the centroid-band filter's dataset replaces the synthesis one."""
    synthesis = done["synthesis"]
    if not cfg.synthesis.rcdm.filter.enabled:
        return synthesis
    filtered = rcdm.run_rcdm_filter(cfg, synthesis, done["embed"], resume, tracker)
    return {**synthesis, "dataset": filtered["dataset"], "num_samples": filtered["num_samples"],
            "unfiltered_dataset": synthesis["dataset"], "filter": filtered["filter"]}


# The built-in stages (their hash inputs: ``config.STAGE_INPUTS``).
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("caption", _run_caption, dir=caption.caption_dir,
          read=lambda cfg, summary: caption.captions_by_class(cfg, summary["captions"])),
    Stage("adapt", _run_adapt, dir=adapt.adapt_dir, read=lambda cfg, summary: adapt.read_lora_table(summary["table"])),
    Stage("embed", _run_embed, dir=embed.embed_dir),
    Stage("casd_generator", generator.run_generator, dir=generator.generator_dir,
          upstream=generator.pool_method_config),
    Stage("rcdm_generator", _run_rcdm_generator, dir=rcdm.generator_dir),
    Stage("rcdm_filter", _run_rcdm_filter, dir=rcdm.filter_dir),
)}


def find_stage(name: str) -> Stage | None:
    """A stage of the graph by name: a built-in one, or one a registered method adds (``Method.stages``)."""
    return STAGES.get(name) or method_stage(name)


def stage_dir(stage: Stage, cfg: Config) -> StageDir:
    return stage.dir(cfg) if stage.dir is not None else StageDir.for_config(cfg, stage.name)


def _stage(name: str, method: Method, field: str) -> Stage:
    stage = find_stage(name)
    if stage is None:
        raise ValueError(f"synthesis.method={method.name!r}: Method.{field}={name!r} is no stage of the graph "
                         f"(stages: {', '.join(STAGES)}, and those its methods add)")
    return stage


def need_stage(method: Method, need: str) -> Stage:
    """The stage that meets ``need`` for ``method``: a fixed stage, or for "generator" the one it names."""
    if need == "generator":
        if method.generator is None:
            raise ValueError(f"synthesis.method={method.name!r} needs a generator but names no stage (Method.generator)")
        return _stage(method.generator, method, "generator")
    return STAGES[NEEDS[need]]


def generation_stages(cfg: Config) -> dict[str, Stage]:
    """Role (``NEEDS``'s stage names: caption, embed, adapt, generator) → stage, for what ``synthesis.method``
    needs, in order; a need no stage meets is an error (a config error, raised before any data is read)."""
    method = get_method(cfg.synthesis.method)
    missing = [need for need in method.needs if need != "generator" and NEEDS[need] not in STAGES]
    if missing:
        raise ValueError(f"synthesis.method={method.name!r} needs {', '.join(missing)}, which no stage of this "
                         f"pipeline produces (stages: {', '.join(STAGES)})")
    clash = [s.name for s in method.stages if s.name in STAGES]
    if clash:
        raise ValueError(f"synthesis.method={method.name!r}: Method.stages {clash} share a built-in stage's name")
    stages = {NEEDS[need]: need_stage(method, need) for need in NEEDS if need in method.needs}
    if method.after_synthesis is not None:
        _stage(method.after_synthesis, method, "after_synthesis")
    return stages


def run_method_stages(cfg: Config, model: str | None, resume: bool = True, tracker=None,
                      until: str | None = None) -> dict[str, dict]:
    """Run the stages the method needs (through role ``until``, if given); {role: summary}."""
    done: dict[str, dict] = {}
    for role, stage in generation_stages(cfg).items():
        upstream = stage.upstream(cfg) if stage.upstream is not None else None
        if upstream is not None and not (resume and stage_dir(stage, cfg).is_complete()):
            print(f"[{stage.name}] first its pool: the {upstream.synthesis.method} generation of this data")
            done["pool"] = run_generation(upstream, None, resume, tracker)
        done[role] = stage.run(cfg, model, done, resume, tracker)
        if role == until:
            break
    return done


def plan_artifacts(cfg: Config, done: dict[str, dict]) -> dict[str, Any]:
    """What planning reads of each stage the method ran: {role: ``Stage.read`` of its summary}."""
    stages = generation_stages(cfg)
    return {role: stages[role].artifact(cfg, summary) for role, summary in done.items() if role in stages}


def run_generation(cfg: Config, class_names: list[str] | None = None, resume: bool = True, tracker=None) -> dict:
    """The method's whole generation path: the stages it needs → plan → synthesis → its step after synthesis.

    ``class_names``: the prepared data's (read from the prepare stage when None)."""
    from synthset.stages.foundation import foundation_model_path
    from synthset.stages.prepare import load_splits
    from synthset.stages.synthesize import run_synthesis

    method, model = get_method(cfg.synthesis.method), foundation_model_path(cfg)
    class_names = class_names if class_names is not None else load_splits(cfg).class_names
    done = run_method_stages(cfg, model, resume, tracker)
    context = method.plan_context(cfg, class_names, plan_artifacts(cfg, done))
    loras = done["adapt"]["loras"] if "adapt" in done else None
    if "generator" in done:  # a method with its own generator synthesises with it
        model = done["generator"]["model"]
    summary = run_synthesis(cfg, model, class_names, resume, tracker, context, loras, method)
    if method.after_synthesis is not None:  # e.g. RCDM's filter: the label stage reads what it returns
        after = _stage(method.after_synthesis, method, "after_synthesis")
        summary = after.run(cfg, model, {**done, "synthesis": summary}, resume, tracker)
    return {**summary, **{role: done.get(role) for role in NEEDS.values()}}


def stage_dirs(cfg: Config) -> dict[str, StageDir]:
    """Role → ``StageDir`` of each stage the method needs, in order (for --dry-run)."""
    return {role: stage_dir(stage, cfg) for role, stage in generation_stages(cfg).items()}
