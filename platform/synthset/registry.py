"""The method registry: what a generation method declares (``Method``) and the table of registered ones.

A plain module under the config: ``synthset.config`` validates ``synthesis.method`` (and the settings only
some methods read) through it, and it imports nothing of the platform. The built-in methods are the
modules of ``synthset/methods/``, registered when that package is imported (``methods/__init__.py``);
``register`` adds one defined elsewhere (a test's toy method). See ``methods/__init__.py`` for what
each field of a ``Method`` means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np

# A pipeline config (``synthset.config.Config``): named, not imported, because the config validates
# ``synthesis.method`` through this registry (config → registry, never back).
Config = Any

# What a method may need before generating, in the order the pipeline produces it, with the role of the
# stage that produces it (``stages/graph.py`` declares the stages; "generator" is the one the method names).
NEEDS = {"captions": "caption", "embeddings": "embed", "loras": "adapt", "generator": "generator"}
LORAS_PER = ("dataset", "class", "image")


@dataclass(frozen=True)
class PlanContext:
    """What planning needs besides (run seed, index): names, prompts and the adaptation tables.

    captions: class id → [(private index, caption)], the captioned real images of that class.
    loras: class id → global LoRA ids of that class (DataDream: one; LoFT: one per real image;
    TCKR: the single dataset LoRA under every class).
    """

    class_names: list[str]
    prompt_template: str = "a photo of a {class}"
    caption_template: str = "{class}: {caption}"
    captions: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    loras: dict[int, list[int]] = field(default_factory=dict)
    fusion: Any = None  # the ``config.FusionConfig`` of ``synthesis.fusion`` (LoFT's λ and mode), as validated


@dataclass(frozen=True)
class LoraAdaptation:
    """The LoRAs a method trains in the adapt stage (``stages/adapt.py``) and how synthesis applies them.

    per: ``"dataset"``, one LoRA over every selected real image (TCKR); ``"class"``, one per class
    over that class's images (DataDream); ``"image"``, one per real image (LoFT).
    rank, lr, targets: the method's own settings (DESIGN.md, method notes); ``adapt.rank``,
    ``adapt.lr`` and ``adapt.targets`` override them.
    prompt: the training prompt of an image: ``"class"``, ``synthesis.prompt_template``;
    ``"caption"``, ``synthesis.caption_template`` with the image's caption (needs captions).
    fold_into_unet: every request uses LoRA 0 at weight 1, so synthesis merges it into the UNet's
    weights once (``lora.bank.fold_lora_into_base``, base speed) instead of routing each sample.
    """

    per: str
    rank: int
    lr: float
    targets: str = "attention"
    prompt: str = "class"
    fold_into_unet: bool = False

    def __post_init__(self):
        if self.per not in LORAS_PER:
            raise ValueError(f"LoraAdaptation.per: {self.per!r} is not one of {LORAS_PER}")
        if self.prompt not in ("class", "caption"):
            raise ValueError(f"LoraAdaptation.prompt: {self.prompt!r} is not 'class' or 'caption'")
        if self.fold_into_unet and self.per != "dataset":
            raise ValueError("LoraAdaptation.fold_into_unet: only a single LoRA (per='dataset') can be folded")

    def owners(self, shot_labels: np.ndarray) -> tuple[np.ndarray, int]:
        """(LoRA id of each training image, number of LoRAs) for images of classes ``shot_labels``."""
        import numpy as np

        if self.per == "dataset":
            return np.zeros(len(shot_labels), dtype=np.int64), 1
        if self.per == "class":
            return shot_labels.astype(np.int64), int(shot_labels.max()) + 1
        return np.arange(len(shot_labels), dtype=np.int64), len(shot_labels)


@dataclass(frozen=True)
class Stage:
    """One stage of the generation graph, declared as a value (``stages/graph.py`` walks them).

    run: ``(cfg, foundation model path, summaries of the stages before it, resume, tracker) -> summary``.
    inputs: the config sections its output depends on (its hash; the built-in stages' are
    ``config.STAGE_INPUTS``). dir: its ``StageDir`` for a config (None: ``<output.root>/<name>/<hash>``).
    read: what planning reads of its summary (``Method.plan_context``'s artifacts; None: the summary).
    upstream: the config of another generation it reads, run first and handed over as ``done["pool"]``.
    """

    name: str
    run: Callable[..., dict]
    inputs: tuple[str, ...] = ()
    dir: Callable[[Any], Any] | None = None
    read: Callable[[Any, dict], Any] | None = None
    upstream: Callable[[Any], Any] | None = None

    def artifact(self, cfg, summary: dict) -> Any:
        return summary if self.read is None else self.read(cfg, summary)


@dataclass(frozen=True)
class Method:
    """One generation method's declaration (see the module docstring for each field)."""

    name: str
    plan_requests: Callable[[int, int, int, PlanContext], list[dict]]
    plan_context: Callable[[Config, list[str], dict[str, dict]], PlanContext]
    load_generator: Callable[..., Any]
    generate_batch: Callable[[Any, list[dict], Any], np.ndarray]
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    lora: LoraAdaptation | None = None
    check: Callable[[Config, np.ndarray, list[str]], None] | None = None
    # A method that trains its own generator (needs "generator") names the graph's stage that trains it; its
    # summary's ``"model"`` is the directory synthesis loads.
    generator: str | None = None
    # A stage of the graph between synthesis and labelling (RCDM's centroid-band filter); its summary's
    # ``dataset`` is what the label stage reads.
    after_synthesis: str | None = None
    # Its own settings: a pydantic model (a ``config.Section``) the config validates ``synthesis.<name>``
    # with; read by this method only, so left out of the other methods' stage hashes.
    settings: type | None = None
    # Of those, the ones only its after-synthesis stage reads (left out of the synthesis stage's hash), and
    # the ones that say how work runs, not what it makes (left out of every hash).
    after_synthesis_settings: tuple[str, ...] = ()
    execution_only: tuple[str, ...] = ()
    # Stages it adds to the graph (its generator's, a filter's), named by ``generator`` / ``after_synthesis``.
    stages: tuple[Stage, ...] = ()

    def __post_init__(self):
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {unknown} (choose from {', '.join(NEEDS)})")
        if ("loras" in self.needs) != (self.lora is not None):
            raise ValueError(f"method {self.name!r}: needs 'loras' exactly when it declares its LoRAs (lora=...)")
        if ("generator" in self.needs) != (self.generator is not None):
            raise ValueError(f"method {self.name!r}: needs 'generator' exactly when it names its generator's stage "
                             "(generator='<stage>')")
        if self.lora is not None and self.lora.prompt == "caption" and "captions" not in self.needs:
            raise ValueError(f"method {self.name!r}: trains LoRAs on caption prompts, so it needs 'captions'")

    @property
    def hashed_settings(self) -> tuple[str, ...]:
        """The method-only settings this method reads: its ``reads``, its own ``synthesis.<name>`` and, with
        LoRAs, ``adapt``."""
        own = (f"synthesis.{self.name}",) if self.settings is not None else ()
        return tuple(dict.fromkeys((("adapt",) if self.lora is not None else ()) + tuple(self.reads) + own))


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (method modules are registered on import; see ``_discover``)."""
    if not isinstance(method, Method):
        raise TypeError(f"register: expected a Method, got {type(method).__name__}")
    if not method.name.isidentifier():
        raise ValueError(f"method name {method.name!r}: must be an identifier (it names a module and a config value)")
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    taken = {s.name: m.name for m in REGISTRY.values() if m.name != method.name for s in m.stages}
    clash = [s.name for s in method.stages if s.name in taken]
    if clash:
        raise ValueError(f"method {method.name!r}: stage(s) {clash} are already added by {taken[clash[0]]!r}")
    REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The valid values of ``synthesis.method``."""
    return tuple(REGISTRY)


def get_method(name: str) -> Method:
    if not REGISTRY:
        raise ValueError(f"synthesis.method: no method is registered, so {name!r} is unknown (import "
                         "synthset.methods, which registers the built-in methods)")
    if name not in REGISTRY:
        raise ValueError(f"synthesis.method: unknown method {name!r} (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


def method_stages(name: str) -> tuple[str, ...]:
    """The stages that produce what method ``name`` needs, in pipeline order (e.g. TCKR: caption, adapt)."""
    needs = get_method(name).needs
    return tuple(stage for need, stage in NEEDS.items() if need in needs)


def methods_needing(need: str) -> tuple[str, ...]:
    return tuple(name for name, m in REGISTRY.items() if need in m.needs)


def method_only_settings() -> dict[str, tuple[str, ...]]:
    """Config setting (dotted path) → the methods that read it, for every setting some method declares."""
    readers: dict[str, list[str]] = {}
    for name, m in REGISTRY.items():
        for key in m.hashed_settings:
            readers.setdefault(key, []).append(name)
    return {key: tuple(names) for key, names in readers.items()}


def method_settings() -> dict[str, type]:
    """Method name → the model of its own settings (``synthesis.<name>``), for the methods that have one."""
    return {name: m.settings for name, m in REGISTRY.items() if m.settings is not None}


def settings_left_out(kind: str) -> tuple[str, ...]:
    """The methods' settings a stage hash leaves out: ``"execution"`` (every hash) or ``"after_synthesis"``
    (the synthesis stage's)."""
    field = {"execution": "execution_only", "after_synthesis": "after_synthesis_settings"}[kind]
    return tuple(key for m in REGISTRY.values() for key in getattr(m, field))


def method_stage(name: str) -> Stage | None:
    """The stage ``name`` that a registered method adds to the graph, if one does."""
    return next((s for m in REGISTRY.values() for s in m.stages if s.name == name), None)


def base_context(cfg: Config, class_names: list[str], captions: dict | None = None,
                 loras: dict | None = None) -> PlanContext:
    """A method's ``PlanContext``: the config's prompt templates and fusion settings, plus its tables."""
    syn = cfg.synthesis
    return PlanContext(class_names, syn.prompt_template, syn.caption_template, captions or {}, loras or {},
                       syn.fusion)


def plan_requests(method: str, start: int, stop: int, run_seed: int, context: PlanContext) -> list[dict]:
    """Request rows of images ``start … stop-1`` of method ``method`` (see DESIGN.md, "Generation request")."""
    return get_method(method).plan_requests(start, stop, run_seed, context)


def plan_loras(method: str, shot_labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(LoRA id of each training image, number of LoRAs) for ``method``'s adaptation."""
    lora = get_method(method).lora
    if lora is None:
        raise ValueError(f"synthesis.method={method!r} has no adaptation stage")
    return lora.owners(shot_labels)
