"""The method registry: every generation method is one module of this package, registered by name.

A method module (``class_prompt.py``, ``caption_prompt.py``, ``tckr.py``, ``datadream.py``,
``loft.py``) ends with ``METHOD = Method(...)``, which declares:

- ``needs``: what it needs from the real data before generating, out of ``NEEDS``: captions
  (the caption stage), LoRAs (the adapt stage; ``lora`` says how many, of what rank, trained with
  which prompts), embeddings, or a generator of its own. The pipeline runs the stages of those
  needs in ``NEEDS`` order (``method_stages``) and nothing else.
- ``reads``: config settings that only the methods declaring them read (e.g. ``synthesis.fusion``);
  they are left out of every other method's stage hashes (``method_only_settings``,
  ``config.stage_hash``). The ``adapt`` section counts as read by every method with LoRAs.
- ``plan_context(cfg, class_names, artifacts)``: the ``PlanContext`` its planning needs, built
  from what the stages it needs wrote, as each stage reads it (``stages/graph.py``, ``Stage.read``):
  ``artifacts["caption"]`` (class id → [(private position, caption)]), ``artifacts["adapt"]`` (the LoRA
  table), else a stage's summary.
- ``plan_requests(start, stop, run_seed, context)``: the request rows of images start … stop-1,
  a pure function of (run seed, index) and the context (``methods.plan``), so every method shares
  resume, determinism and prefix semantics.
- ``load_generator(model_path, loras, synthesis, device, dtype)``: its generator, loaded once per
  synthesis actor; ``generate_batch(generator, requests, synthesis)``: uint8 images of a batch.
- ``check(cfg, private_labels, class_names)`` (optional): what can be checked before any work.
- ``generator`` (optional): the name of the stage of the graph (``stages/graph.py``, ``STAGES``) that
  trains its own generator; ``after_synthesis`` (optional): the name of a stage run on the written
  shards before labelling (RCDM's filter). A method names stages; it never imports ``stages/``.

Method modules are found on import (``pkgutil``): adding a method is adding one file here (plus
its algorithm in ``diffusion/`` or ``lora/``); the config's choices for ``synthesis.method``, the
stage hashes and the pipeline's stage order follow. ``register`` adds a method defined elsewhere
(a test's toy method). The declarations and the table live in ``synthset/registry.py``, under the
config (which validates ``synthesis.method`` through it); importing this package registers the built-in
methods, so import it (the pipeline, stages and jobs do) before reading a config. Method modules stay
light: plain data and small functions at import, torch and the models imported inside the functions.
"""

from __future__ import annotations

import importlib
import pkgutil

from synthset.registry import (LORAS_PER, NEEDS, REGISTRY, LoraAdaptation, Method, PlanContext, base_context,
                               get_method, method_names, method_only_settings, method_stages, methods_needing,
                               plan_loras, plan_requests, register)

__all__ = ["LORAS_PER", "NEEDS", "REGISTRY", "LoraAdaptation", "Method", "PlanContext", "base_context", "get_method",
           "method_names", "method_only_settings", "method_stages", "methods_needing", "plan_loras", "plan_requests",
           "register"]


def _discover() -> None:
    """Register the ``METHOD`` of every module of this package (modules without one are helpers)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if method is None:
            continue
        if not isinstance(method, Method) or method.name != info.name:
            raise ValueError(f"{module.__file__}: METHOD must be a Method named {info.name!r} like its module")
        register(method)


_discover()
