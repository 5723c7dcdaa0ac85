"""Typed pipeline configuration: YAML in ``conf/`` → validated models → a stable hash.

``load_config("conf/quickstart.yaml", overrides=["synthesis.guidance_scale=2"])`` reads the YAML,
applies ``--set``-style overrides, and validates everything before any work starts. Unknown keys
and out-of-range values raise ``ValueError`` naming the field's dotted path. ``stage_hash`` hashes
just the sections a stage depends on, so a changed Student setting does not retrain the Teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

# The method registry (registry.py; the built-in methods register on import of synthset.methods): it names synthesis.method's
# choices and the settings only some methods read.
from synthset.registry import (get_method, method_names, method_only_settings, method_settings, method_stage,
                               settings_left_out)


def _require_class_placeholder(v: str) -> str:
    if "{class}" not in v:
        raise ValueError("must contain '{class}'")
    return v


# A prompt with a ``{class}`` placeholder, e.g. "a photo of a {class}".
PromptTemplate = Annotated[str, AfterValidator(_require_class_placeholder)]


def _require_caption_placeholders(v: str) -> str:
    if "{class}" not in v or "{caption}" not in v:
        raise ValueError("must contain '{class}' and '{caption}'")
    return v


# A prompt with ``{class}`` and ``{caption}`` placeholders, e.g. TCKR's "{class}: {caption}".
CaptionTemplate = Annotated[str, AfterValidator(_require_caption_placeholders)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "synthset"
    seed: int = Field(0, ge=0, description="Seeds the generation plan: each image's seed derives from (seed, index).")


# Query parameters of a URI that carry secrets (pyarrow's s3 access_key/secret_key/session_token, tokens, passwords).
_SECRET_QUERY_WORDS = ("key", "token", "secret", "password", "passwd", "signature", "credential")


def uri_credentials(uri: str) -> str | None:
    """What secret ``uri`` carries (``"a password"``, ``"a user name"``, ``"a 'token' query parameter"``), or None.

    Credentials never belong in a config: it is hashed, written beside every artifact as ``config.yaml``
    and logged to MLflow. The message never repeats the value.
    """
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    if parts.password is not None:
        return "a password (before the @)"
    if parts.username is not None and parts.scheme in ("http", "https"):
        return "a user name or token (before the @)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if any(word in name.lower() for word in _SECRET_QUERY_WORDS):
            return f"a {name!r} query parameter"
    return None


# Where each kind of URI's credentials belong instead (the hint of the error that rejects them).
_OBJECT_STORE_HINT = ("Give object-store credentials in the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                      "for s3://, workload identity or GOOGLE_APPLICATION_CREDENTIALS for gs://; a hub token in HF_TOKEN.")
_MLFLOW_HINT = ("Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                "environment instead; MLflow reads them there.")


def _no_secret(hint: str):
    def check(value: Any) -> Any:
        problem = uri_credentials(value) if isinstance(value, str) else None
        if problem:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("uri_credentials", "the URI holds {problem}; credentials are not allowed in "
                                      "a config (it is written beside every artifact and logged to MLflow). {hint}",
                                      {"problem": problem, "hint": hint})
        return value
    return check


# Every path or URI field of the config (a directory, a bucket prefix, a hub id, a server): one type that
# refuses embedded credentials before anything is printed, hashed or written, without repeating them.
Uri = Annotated[str, BeforeValidator(_no_secret(_OBJECT_STORE_HINT))]
TrackingUri = Annotated[str, BeforeValidator(_no_secret(_MLFLOW_HINT))]


def _a_root_of_its_own(value: str) -> str:
    from synthset.storage import root_problem

    problem = root_problem(value)
    if problem:
        raise ValueError(problem)
    # A local root is made absolute where the config is read: Ray Train workers and pool actors run in other
    # working directories, where a relative root would name another place (outside the real root).
    return value if "://" in value else os.path.abspath(os.path.expanduser(value))


class OutputConfig(Section):
    root: Annotated[Uri, AfterValidator(_a_root_of_its_own)] = Field("runs/default", description="Directory (or pyarrow filesystem URI) for every artifact. "
                      "Credentials come from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, workload "
                      "identity), never from the URI.")


class TrackingConfig(Section):
    enabled: bool = True
    uri: TrackingUri | None = Field(None, description="MLflow tracking URI, without credentials; default: the "
                            "MLFLOW_TRACKING_URI environment variable, else sqlite:///<output.root>/mlflow.db. "
                            "Credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                            "MLFLOW_TRACKING_TOKEN in the environment.")
    experiment: str = "synthset"


class RayConfig(Section):
    address: Uri | None = Field(None, description="Ray cluster address; None starts or joins a local one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray.")


class SplitsConfig(Section):
    public: int = Field(30_000, ge=0, description="Images that pretrain the foundation model.")
    private: int = Field(30_000, ge=10, description="The user's real data: Teacher, adaptation, membership.")
    seed: int = Field(0, ge=0)
    holdout: int = Field(0, ge=0, description="Private images set aside as known non-members for LiRA: a seeded "
                         "subset of the `private` pool that nothing (Teacher, captions, adaptation, Students) trains on; "
                         "the private training split is the rest (data/splits.py). 0: none.")

    @model_validator(mode="after")
    def _holdout_fits(self):
        if self.holdout and self.private - self.holdout < 10:
            raise ValueError(f"holdout ({self.holdout}) must leave >= 10 of the {self.private} private images to train on")
        return self


class CaptionConfig(Section):
    """Captions of the real images (TCKR / CaptionPrompt prompts ``"{class}: {caption}"``)."""

    captioner: Uri = Field("properties", min_length=1, description='"properties": the embedded captioner, '
                           "which words measured brightness, size, aspect and texture; otherwise a transformers "
                           "image-to-text model (BLIP-2 in production) by hub id or local directory.")
    prompt: str | None = Field(None, description="Text the model continues (e.g. 'a photo of'); None: image only.")
    max_new_tokens: int = Field(20, ge=1, le=512)
    batch_size: int = Field(256, ge=1, description="Images per model call.")
    part_size: int = Field(2000, ge=1, description="Images per resumable output part.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Model dtype on GPU (CPU: float32).")
    actors: "ActorsConfig" = Field(default_factory=lambda: ActorsConfig())


PUBLIC_SHIFTS = ("none", "shrink", "blur", "flip", "invert")
# The real-image sources (data/sources.py holds one opener per name; a test keeps the two in step).
DATA_SOURCES = ("fashion_mnist", "digits", "image_folder", "webdataset", "hf")
# Sources that read the user's data from data.path.
PATH_SOURCES = ("image_folder", "webdataset", "hf")


class DataConfig(Section):
    source: Literal[DATA_SOURCES] = Field(
        "fashion_mnist", description="The real images: fashion_mnist (IDX files, see root), digits (sklearn's 8x8 "
        "digits, a test fixture), image_folder (root/<class>/<image> folders), webdataset (.tar shards), hf (a Hugging "
        "Face datasets dataset); the last three read data.path (data/sources.py).")
    root: Uri | None = Field(None, description="fashion_mnist only: directory holding the four IDX files (.gz or raw).")
    download: bool = Field(True, description="fashion_mnist: fall back to the official download when no local "
                           "copy exists.")
    path: Uri | None = Field(
        None, description="Where image_folder, webdataset and hf read (required for them): image_folder: the directory "
        "whose subfolders are the classes (sorted names = class names); webdataset: a directory of .tar shards or a "
        "brace/glob pattern such as 'shards/train-{000000..000009}.tar'; hf: a directory written by save_to_disk, or a "
        "hub id (loaded with load_dataset where the network allows).")
    test_path: Uri | None = Field(
        None, description="image_folder / webdataset: the test images, laid out as data.path (same class folders / "
        "labels). None: a fixed data.test_fraction of data.path's images is the test set.")
    split: str = Field("train", min_length=1, description="hf: the dataset split holding the training images.")
    test_split: str | None = Field(
        None, description="hf: the dataset split holding the test images; None: a fixed data.test_fraction of split.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Sources without their own test images (no test_path / test_split): about this "
        "fraction of the images, chosen by a hash of each image's key (no seed: the same test set for every split "
        "seed, and an image stays where it is when others are added), becomes the test set.")
    channels: Literal[1, 3] = Field(
        1, description="Colour mode images are converted to: 1 = grayscale ('L'), 3 = RGB. Transparent pixels are "
        "composited over data.alpha_background (data/images.py).")
    alpha_background: int = Field(
        255, ge=0, le=255, description="Grey level (0 black .. 255 white) that images with transparency (RGBA, LA, "
        "palette with a transparent colour) are composited over, instead of dropping their alpha channel.")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="An image file that cannot be decoded (or a sample without image or label): error = stop "
        "with a ValueError naming it; skip = leave it out and list it (ImageSet.skipped, printed by load_source).")
    image_column: str = Field("image", min_length=1, description="hf: the column holding the images.")
    label_column: str = Field("label", min_length=1, description="hf: the column holding the labels (a ClassLabel "
                              "gives the class names; otherwise integers or class-name strings).")
    label_key: str | None = Field(
        None, min_length=1, description="webdataset: None reads the label from each sample's .cls member; a name "
        "reads that field of its .json member (an integer class index or a class-name string).")
    class_names: list[str] | None = Field(
        None, min_length=2, description="webdataset / hf: the class names, in class-index order, when the data has "
        "none of its own (no ClassLabel feature, no manifest.json); None: sorted string labels, or '0', '1', … for "
        "integer labels.")
    image_size: int = Field(32, ge=8, le=1024, description="Images are zero-padded/resized to this square size.")
    follow_links_outside: bool = Field(False, description="image_folder: follow symbolic links whose target lies "
                                       "outside data.path (off: such a link is an error naming it).")
    max_image_pixels: int | None = Field(None, ge=1, description="The most pixels a source image may declare "
                                         "before it is decoded (a decompression bomb is a bad image); None: 4096² or "
                                         "64 × data.image_size², whichever is larger.")
    splits: SplitsConfig = SplitsConfig()
    public_shift: Literal[PUBLIC_SHIFTS] = Field(
        "shrink", description="How the public split (the foundation model's pretraining data) differs from the "
        "private and test data, so that adapting to the private data has something to learn (data/splits.py: "
        "shrink = items scaled to 70% of their size, blur = Gaussian blur of radius 1 px, flip = upside down, "
        "invert = negative; none = the same distribution).")
    public_classes: list[str] | None = Field(
        None, description="Class names the public split keeps (None: all); the others are new to the foundation model.")
    caption: CaptionConfig = Field(default_factory=lambda: CaptionConfig())

    @model_validator(mode="after")
    def _source_fields(self):
        """Each source's required fields are set, and no field is set that the chosen source would ignore."""
        if self.source in PATH_SOURCES and not self.path:
            raise ValueError(f"data.path: required for data.source={self.source!r} (the folder, shards or dataset "
                             "to read)")
        if self.source not in PATH_SOURCES and (self.path or self.test_path):
            field = "data.path" if self.path else "data.test_path"
            raise ValueError(f"{field}: not read by data.source={self.source!r}, only by {', '.join(PATH_SOURCES)}")
        if self.source in PATH_SOURCES and self.root:
            raise ValueError(f"data.root: read only by data.source='fashion_mnist'; {self.source} reads data.path")
        if self.source == "hf" and self.test_path:
            raise ValueError("data.test_path: not read by data.source='hf'; name its test split in data.test_split")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"data.class_names: repeated names in {self.class_names}")
        return self


class FoundationArch(Section):
    image_size: int = Field(32, ge=8, le=1024)
    image_channels: int = Field(1, ge=1, le=4, description="Channels of the VAE's images; follows data.channels "
                                "when left out (set it only to check they agree).")
    latent_channels: int = Field(4, ge=1, le=16)
    vae_channels: list[int] = [32, 64, 64]
    unet_channels: list[int] = [64, 128]
    unet_layers_per_block: int = Field(1, ge=1, le=4)
    unet_attention_levels: list[int] = Field([1], description="UNet levels (0 = highest resolution) with cross-attention.")
    attention_head_dim: int = Field(8, ge=1)
    text_width: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    max_prompt_tokens: int = Field(16, ge=4, le=77)
    norm_groups: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _shapes(self):
        for name in ("vae_channels", "unet_channels"):
            channels = getattr(self, name)
            if not channels or any(c % self.norm_groups for c in channels):
                raise ValueError(f"{name}: every entry must be a positive multiple of norm_groups={self.norm_groups}")
        bad = [i for i in self.unet_attention_levels if not 0 <= i < len(self.unet_channels)]
        if bad:
            raise ValueError(f"unet_attention_levels: levels {bad} outside 0..{len(self.unet_channels) - 1}")
        return self


class PretrainConfig(Section):
    seed: int = Field(0, ge=0)
    vae_steps: int = Field(600, ge=1)
    vae_batch_size: int = Field(128, ge=1)
    vae_lr: float = Field(2e-3, gt=0, le=1)
    vae_kl_weight: float = Field(2.5e-4, ge=0, description="KL weight; a smoother latent is easier to diffuse.")
    unet_steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="Probability of an empty prompt (classifier-free guidance).")
    min_snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR-γ loss weighting; null for plain MSE.")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of UNet/text-encoder weights; null to disable.")
    prompt_template: PromptTemplate = "a photo of a {class}"
    caption_template: CaptionTemplate = "{class}: {caption}"
    caption_probability: float = Field(0.5, ge=0, le=1, description="Probability that a pretraining image is "
                                       "prompted with caption_template (its data.caption caption) instead of "
                                       "prompt_template; drawn per image, seeded by seed.")
    vae_unshifted: bool = Field(True, description="Train the VAE on the public images both with and without "
                                "data.public_shift (a general-purpose autoencoder, like Stable Diffusion's); the UNet "
                                "and text encoder only see the shifted ones.")
    num_cpus: int = Field(2, ge=1)
    use_gpu: bool = False


class FoundationConfig(Section):
    path: Uri | None = Field(None, description="Hub id or directory of a pretrained pipeline; None pretrains the embedded one.")
    arch: FoundationArch = FoundationArch()
    pretrain: PretrainConfig = PretrainConfig()


class ActorsConfig(Section):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (fractions share one).")
    num_cpus: float = Field(1, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class FusionConfig(Section):
    """LoFT's fusion of per-image LoRAs (Eq. 4): which LoRAs mix and with what weights."""

    mode: Literal["pair", "triple", "single"] = Field("pair", description="pair: λΔW_i + (1−λ)ΔW_j (LoFT); "
                                                      "triple: three LoRAs; single: one LoRA at weight 1 (λ = 1)")
    lam: float = Field(0.5, ge=0, le=1, description="λ for mode=pair when beta_alpha is null")
    beta_alpha: float | None = Field(None, gt=0, description="Draw λ ~ Beta(α, α) per image "
                                     "(triple: Dirichlet(α, α, α)); null: fixed lam")


class AdaptConfig(Section):
    """LoRA adaptation of the foundation UNet to the private split (TCKR, DataDream, LoFT)."""

    shots_per_class: int | None = Field(16, ge=1, description="Real images per class the LoRAs see (seeded "
                                        "choice from the private split); null: all of them")
    rank: int | None = Field(None, ge=1, le=256, description="LoRA rank; null: the method's own "
                             "(TCKR 4, DataDream 16, LoFT 2)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: equal to the rank")
    targets: Literal["attention", "transformer", "locon"] | list[str] | None = Field(
        None, description="UNet modules the LoRAs adapt: 'attention' (to_q/k/v/out, the seeds' choice), "
        "'transformer' (every linear layer of the transformer blocks), 'locon' (those plus the ResNet and "
        "resampling convolutions), or a list of module names; null: the method's own")
    steps: int = Field(300, ge=1, description="Optimiser steps per LoRA")
    lr: float | None = Field(None, gt=0, le=1, description="AdamW learning rate (cosine); null: the method's own")
    batch_per_lora: int = Field(4, ge=1, description="Samples per LoRA per step")
    loras_per_bank: int = Field(16, ge=1, description="LoRAs trained together in one batched forward (LoFT)")
    min_snr_gamma: float | None = Field(5.0, gt=0)
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, description="Banks trained in parallel (Ray tasks; TCKR: Ray Train workers)")
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False


def check_unet_levels(channels: list[int], norm_groups: int, attention_levels: list[int]) -> None:
    """A pixel UNet's block widths divide into its norm groups and its attention levels exist."""
    bad = [c for c in channels if c % norm_groups]
    if bad:
        raise ValueError(f"channels: {bad} not divisible by norm_groups ({norm_groups})")
    bad = [i for i in attention_levels if not 0 <= i < len(channels)]
    if bad:
        raise ValueError(f"attention_levels: {bad} outside 0..{len(channels) - 1}")


class DiffusionTrainConfig(Section):
    """Training a method's own diffusion model with Ray Train (``diffusion/generator_training.py``): the fields
    CASD's ``synthesis.casd.train`` and RCDM's ``synthesis.rcdm.train`` share (CASD's defaults)."""

    steps: int = Field(400, ge=1, description="Optimiser steps (the budget, equal for CASD, SDA and DM).")
    batch_size: int = Field(64, ge=1, description="Images per step, over all workers (the result does not depend "
                            "on how many workers share it, up to float rounding).")
    lr: float = Field(2e-4, gt=0, le=1, description="Adam learning rate, after a linear warm-up.")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of the weights (sampling uses it); null: "
                                    "sample with the raw weights.")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (data parallel: gloo on CPU, NCCL on GPU).")
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False
    mixed_precision: Literal["no", "bf16"] = Field("bf16", description="Autocast on GPU (bf16); CPU runs float32.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (safetensors through Ray Train); "
                                  "a killed run resumes from the last one.")
    sample_every: int | None = Field(None, ge=1, description="Steps between sample grids (saved in the stage "
                                     "directory, logged to MLflow); null: only at the end.")


class SynthesisConfig(Section):
    method: str = Field("class_prompt", description="The generation method, by the name of its module in "
                        "synthset/methods/ (e.g. class_prompt, loft); its declaration says what it needs (captions, "
                        "LoRAs) and so which stages run.")
    prompt_template: PromptTemplate = "a photo of a {class}"
    caption_template: CaptionTemplate = Field("{class}: {caption}", description="Prompt of caption_prompt and tckr")
    fusion: FusionConfig = FusionConfig()
    images_per_class: int = Field(1000, ge=1)
    guidance_scale: float = Field(3.0, ge=0, le=50)
    num_inference_steps: int = Field(10, ge=1, le=1000)
    resolution: int | None = Field(None, ge=8, le=4096, description="Output size in pixels; None: the model's native size.")
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = Field(False, description="torch.compile the UNet (GPU; slow first batch, may change low bits).")
    actors: ActorsConfig = ActorsConfig()
    # Beside these shared fields, ``synthesis.<name>`` holds the own settings of each registered method that
    # declares them (``Method.settings``: ``synthesis.rcdm``, ``synthesis.casd``), validated by its model and
    # read by that method only (left out of the other methods' hashes).
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @model_validator(mode="wrap")
    @classmethod
    def _method_settings(cls, data: Any, handler):
        if not isinstance(data, dict):
            return handler(data)
        data, errors, own = dict(data), [], method_settings()
        for key in data:
            if key not in cls.model_fields and key not in own:
                errors.append((PydanticCustomError("extra_forbidden", "Extra inputs are not permitted"), (key,), data[key]))
        for name, model in own.items():
            value = data.get(name, {})
            if isinstance(value, model):
                continue
            try:
                data[name] = model.model_validate(value)
            except ValidationError as err:
                errors += [(PydanticCustomError(e["type"], e["msg"]),
                            (name, *e["loc"]), e["input"]) for e in err.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, [
                {"type": error, "loc": loc, "input": value} for error, loc, value in errors])
        return handler(data)

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        if not method_names():
            raise ValueError(f"unknown method {v!r}: no method is registered (import synthset.methods, which "
                             "registers the built-in methods, before reading a config)")
        if v not in method_names():
            raise ValueError(f"unknown method {v!r}: choose one of {', '.join(method_names())} (synthset/methods/)")
        return v


class ClassifierConfig(Section):
    arch: Literal["cnn", "resnet"] = "cnn"
    width: int = Field(32, ge=4, description="Channels of the first stage (CNN) / embedding size (ResNet).")
    pretrained: Uri | None = Field(None, description="transformers checkpoint (hub id or directory) for arch=resnet.")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    input_blur: float | None = Field(
        None, gt=0, le=4, description="σ (pixels) of a fixed Gaussian low-pass the model applies to every input, in "
        "training and at test: a Student trained on images decoded through a small VAE (softer than real photos) then "
        "sees real test images as soft as its training data. null: none.")
    seed: int = Field(0, ge=0)
    in_memory_bytes: int = Field(256 * 2 ** 20, ge=0, description="A worker's share of the training images is "
                                 "decoded once and kept (uint8, at the model's input size) when it fits in this many "
                                 "bytes; otherwise it streams from the shards every epoch (DataLoader workers, a "
                                 "shuffle buffer of shuffle_bytes), so memory follows the batch, not the dataset.")
    shuffle_bytes: int = Field(64 * 2 ** 20, ge=0, description="Streaming: the shuffle buffer's size in bytes of "
                               "uint8 images (at least 256 images).")
    loader_workers: int = Field(1, ge=0, description="Streaming: DataLoader processes decoding shards beside each "
                                "training worker (0: in the training process).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False


class StudentConfig(ClassifierConfig):
    labels: list[Literal["soft", "hard"]] = Field(["soft", "hard"], min_length=1)
    temperature: float = Field(2.0, gt=0, le=100, description="Distillation temperature for soft labels.")


class LabelConfig(Section):
    batch_size: int = Field(512, ge=1)
    actors: ActorsConfig = ActorsConfig()


class PrivacyConfig(Section):
    """The ``privacy`` section: LiRA membership inference (Carlini et al. 2022), see ``stages/privacy.py``."""

    enabled: bool = Field(False, description="Run LiRA in the evaluation (opt-in: it trains num_shadows models "
                          "per shadow mode).")
    shadow_modes: list[Literal["classifier", "pipeline"]] = Field(
        ["classifier"], min_length=1, description="Shadows for Student targets: 'classifier' = the target's "
        "architecture with the Teacher's recipe on real halves (TCKR's notebook); 'pipeline' = per half: [re-adapt "
        "and re-generate, see pipeline_generation →] Teacher recipe → label the synthetic dataset → Student recipe "
        "(the faithful attack). The Teacher target always uses 'classifier'.")
    pipeline_labels: list[Literal["soft", "hard"]] = Field(
        ["soft", "hard"], min_length=1, description="Student label kinds attacked with 'pipeline' shadows (a hard-label "
        "Student of a generator that does not read the private data never sees it: its pipeline shadows only re-seed "
        "the Student, a chance-level check).")
    pipeline_generation: Literal["auto", "relabel", "regenerate"] = Field(
        "auto", description="What a 'pipeline' shadow repeats of generation on its half: 'regenerate' = re-adapt the "
        "method's LoRAs on the half and generate a new synthetic set from them (the faithful attack on TCKR, "
        "DataDream, LoFT); 'relabel' = re-label the target Student's own synthetic set (faithful for generators that "
        "never read the private data); 'auto' = regenerate for a method with a LoRA adaptation, else relabel.")
    num_shadows: int = Field(16, ge=4, description="Shadow models (even); each candidate is IN for half of them.")
    num_candidates: int | None = Field(
        1000, ge=2, description="Private images whose membership is attacked. With data.splits.holdout > 0: half "
        "from the holdout (OUT of every target), half from the private training split (IN); None: 2 × holdout. "
        "Without a holdout (leave-one-out over shadows): drawn from the private split; None: all of it.")
    seed: int = Field(0, ge=0, description="Seeds the candidate draw, the keep matrix and every shadow's training.")
    query_shift: int = Field(1, ge=0, le=8, description="Query augmentations: identity plus shifts by ± this many "
                             "pixels in x and y (0: identity only).")
    query_flip: bool = Field(False, description="Also query the horizontal flip of every view.")
    cpus_per_shadow: float = Field(1, gt=0, description="Ray CPUs per shadow task (also its torch threads).")
    gpus_per_shadow: float = Field(0, ge=0, description="Ray GPUs per shadow task (fractions pack several per GPU).")
    # The privacy-gated export (jobs/export.py, stages/export.py): thresholds on the Student's LiRA results.
    max_auc: float | None = Field(
        None, ge=0, le=1, description="Export gate: publish only if every Student's LiRA AUC (the highest over "
        "shadow modes and LiRA variants) is at most this; None: not checked.")
    max_tpr_at_0_1pct_fpr: float | None = Field(
        None, ge=0, le=1, description="Export gate: publish only if every Student's LiRA TPR at 0.1% FPR (the "
        "highest over shadow modes and variants) is at most this; None: not checked. This is the threshold on TPR at "
        "0.1% FPR ('max_tpr_at_0.1pct_fpr'), spelled with '_' for the '.': a field name and a --set path cannot "
        "hold a dot.")
    export_to: Annotated[Uri, AfterValidator(_a_root_of_its_own)] | None = Field(
        None, min_length=1, description="Export gate: where a dataset that passes is published (a directory or "
        "pyarrow filesystem URI); None: <output.root>/export/<hash>/data.")

    def shadow_inputs(self) -> dict[str, Any]:
        """The fields that change what a shadow model computes, hence name a shadow set (``stages/privacy.py:
        shadow_dir``); the others choose which sets run, where they run, or what is done with their results."""
        return self.model_dump(mode="json", include={"num_shadows", "num_candidates", "seed", "query_shift",
                                                     "query_flip"})

    @model_validator(mode="after")
    def _even(self):
        if self.num_shadows % 2:
            raise ValueError(f"num_shadows: must be even so every candidate is IN for exactly half (got {self.num_shadows})")
        return self


class ReplicationConfig(Section):
    """The ``replication`` gate between labelling and the Student (``stages/evaluate.py``, ``eval/replication.py``)."""

    enabled: bool = Field(True, description="Check every synthetic image against the private training images.")
    metric: Literal["tiled_l2", "cosine"] = Field("tiled_l2", description="tiled_l2: max-over-tiles RMS pixel "
                                                  "distance (Carlini et al. 2023); cosine: in the `features` space.")
    tile: int = Field(8, ge=1, description="Tile size in pixels for tiled_l2 (must divide data.image_size).")
    reduce: Literal["max", "mean"] = "max"
    features: Uri = Field("teacher", min_length=1, description="Encoder for metric=cosine: 'teacher' (its "
                          "penultimate features) or a transformers image model (hub id or local directory).")
    quantile: float = Field(0.01, gt=0, lt=1, description="Threshold = this quantile of the private images' "
                            "distances to their nearest other private image (calibrated per run).")
    threshold: float | None = Field(None, description="Fixed threshold instead of the calibration.")
    calibration_size: int | None = Field(5000, ge=2, description="Private images used to calibrate (seeded); None: all.")
    action: Literal["flag", "drop"] = Field("flag", description="flag: record copies in the audit; drop: also "
                                            "remove them from the dataset the Student trains on.")
    device: Literal["cpu", "cuda"] = "cpu"
    actors: ActorsConfig = Field(default_factory=lambda: ActorsConfig(), description="The gate's shard-pool actors "
                                 "(one synthetic shard per task; give them num_gpus with device: cuda).")
    # The nearest-neighbour index (eval/replication_index.py). With index: exact the index_* fields are
    # left out of the stage hashes (they change nothing).
    index: Literal["exact", "faiss"] = Field("exact", description="exact: compare every synthetic image with "
                                             "every private image; faiss: an IVF-Flat index over the private set "
                                             "(built once per run), whose recall is measured in docs/benchmarks.md.")
    index_min_private: int = Field(10_000, ge=2, description="index: faiss only from this many private images; "
                                   "smaller sets are searched exactly.")
    index_nlist: int | None = Field(None, ge=1, description="IVF cells (k-means centroids); None: 4·√(private "
                                    "images), at most private images / 39.")
    index_nprobe: int = Field(32, ge=1, description="Cells searched per synthetic image: more is slower and "
                              "closer to the exact search.")
    index_candidates: int = Field(32, ge=1, description="tiled_l2: private images the index proposes per synthetic "
                                  "image, re-ranked with the exact tiled distance.")
    index_grid: int = Field(16, ge=1, description="tiled_l2: the index compares images averaged to this many "
                            "blocks per side (the largest divisor of data.image_size up to it), per channel.")
    index_distance: Literal["max", "rms"] = Field("max", description="tiled_l2: how the index ranks candidates "
                                                  "on the block means: max, the largest difference (L∞, like the "
                                                  "max over tiles); rms, their RMS difference (L2, faster).")


class EvaluateConfig(Section):
    """The ``evaluate`` section: generative metrics, replication statistics, LiRA and the report per dataset."""

    enabled: bool = Field(True, description="Run the evaluation at the end of the pipeline.")
    features: Uri = Field("teacher", min_length=1, description="Feature space of FID/KID/PRDC/diversity: "
                          "'teacher' (its penultimate features) or a transformers image model (Inception, DINOv2) "
                          "by hub id or local directory.")
    sample_size: int = Field(2000, ge=10, description="Synthetic and private images (each, seeded) for the "
                             "generative metrics.")
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    prdc_k: int = Field(5, ge=1)
    grid_per_class: int = Field(10, ge=1, description="Samples per class in the report's grid.")
    seed: int = Field(0, ge=0)


class Config(Section):
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    foundation: FoundationConfig = FoundationConfig()
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)  # built when read: the methods are registered by then
    adapt: AdaptConfig = AdaptConfig()
    teacher: ClassifierConfig = ClassifierConfig()
    label: LabelConfig = LabelConfig()
    student: StudentConfig = StudentConfig()
    replication: ReplicationConfig = ReplicationConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.foundation.path is None and self.foundation.arch.image_size != self.data.image_size:
            raise ValueError(f"foundation.arch.image_size ({self.foundation.arch.image_size}) must equal "
                             f"data.image_size ({self.data.image_size})")
        arch = self.foundation.arch
        if self.foundation.path is None and arch.image_channels != self.data.channels:
            # The embedded foundation model reads the prepared images: its channels follow data.channels
            # unless set explicitly (and then they must agree).
            if "image_channels" in arch.model_fields_set:
                raise ValueError(f"foundation.arch.image_channels ({arch.image_channels}) must equal "
                                 f"data.channels ({self.data.channels}) (or leave it out: it follows data.channels)")
            arch = arch.model_copy(update={"image_channels": self.data.channels})
            object.__setattr__(self, "foundation", self.foundation.model_copy(update={"arch": arch}))
        if self.privacy.pipeline_generation == "regenerate" and get_method(self.synthesis.method).lora is None:
            raise ValueError(f"privacy.pipeline_generation: 'regenerate' re-adapts the generator's LoRAs on each "
                             f"shadow's half, but synthesis.method={self.synthesis.method!r} adapts none (use "
                             "'relabel' or 'auto')")
        rep = self.replication
        if rep.enabled and rep.metric == "tiled_l2" and self.data.image_size % rep.tile:
            raise ValueError(f"replication.tile ({rep.tile}) must divide data.image_size ({self.data.image_size})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Which sections each stage's output depends on; upstream stages are included transitively.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),  # but data.caption (see stage_hash)
    "foundation": ("data", "foundation"),
    "teacher": ("data", "teacher"),
    "caption": ("data",),
    "adapt": ("data", "foundation", "adapt", "synthesis.method", "synthesis.prompt_template",
              "synthesis.caption_template"),
    "synthesis": ("data", "foundation", "adapt", "synthesis", "run.seed"),
    # RCDM (methods/rcdm.py): the embeddings, its denoiser, and the centroid-band filter after synthesis.
    "embed": ("data", "synthesis.rcdm.embed"),
    "rcdm_generator": ("data", "synthesis.rcdm.embed", "synthesis.rcdm.model", "synthesis.rcdm.train"),
    "rcdm_filter": ("data", "foundation", "adapt", "synthesis", "run.seed"),
    # CASD (methods/casd.py): its generator; the pool's identity enters as the extra (stages/generator.py).
    "casd_generator": ("data", "synthesis.casd"),
    "label": ("data", "foundation", "adapt", "synthesis", "run.seed", "teacher", "label"),
    "replication": ("data", "foundation", "adapt", "synthesis", "run.seed", "teacher", "label", "replication"),
    # ``replication`` enters the Student's hash only with action=drop (see stage_hash).
    "student": ("data", "foundation", "adapt", "synthesis", "run.seed", "teacher", "label", "replication", "student"),
    "evaluate": ("data", "foundation", "adapt", "synthesis", "run.seed", "teacher", "label", "replication", "student",
                 "evaluate", "privacy"),
}
# Settings that only some methods read (``adapt``, ``synthesis.fusion``, ``synthesis.caption_template``) are
# left out of the hashes of the others: each method module declares them (``methods.method_only_settings``).


# How work is executed, not what it produces: left out of stage hashes, so a rerun with more
# actors resumes the same dataset instead of starting a new one. The synthesis batch size stays
# in: on CPU, a different batch size can change a pixel by one grey level (tests/stages/test_synthesis_resume.py).
EXECUTION_ONLY = ("synthesis.actors", "label.batch_size", "label.actors",
                  *[f"{role}.{field}" for role in ("teacher", "student")
                    for field in ("in_memory_bytes", "shuffle_bytes", "loader_workers")],
                  "data.caption.actors", "data.caption.batch_size", "data.caption.part_size",
                  "replication.device", "replication.actors", "evaluate.enabled", "privacy.cpus_per_shadow", "privacy.gpus_per_shadow",
                  # the export gate's thresholds and destination: read by the export step only
                  "privacy.max_auc", "privacy.max_tpr_at_0_1pct_fpr", "privacy.export_to")
# … and each method's own (``Method.execution_only``: e.g. when its generator checkpoints and draws sample
# grids, a resumed run equals an unbroken one), gathered from the registry by ``stage_hash``.


def _has(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _dig(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def config_hash(obj: Any) -> str:
    """sha256 (first 12 hex digits) of the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


DATA_FIELDS_SINCE_SOURCES = ("path", "test_path", "split", "test_split", "test_fraction", "channels",
                             "alpha_background", "on_bad_image", "image_column", "label_column", "label_key",
                             "class_names", "follow_links_outside", "max_image_pixels")


REPLICATION_INDEX_FIELDS = ("index", "index_min_private", "index_nlist", "index_nprobe", "index_candidates",
                            "index_grid", "index_distance")


def stage_inputs(stage: str) -> tuple[str, ...]:
    """The config sections ``stage``'s output depends on: ``STAGE_INPUTS``, or those a method declares for a
    stage it adds (``registry.Stage.inputs``)."""
    if stage in STAGE_INPUTS:
        return STAGE_INPUTS[stage]
    added = method_stage(stage)
    if added is None:
        raise KeyError(f"stage {stage!r}: not a stage of the pipeline nor one a registered method adds")
    return added.inputs


def pipeline_generation(cfg: Config) -> str:
    """What the ``pipeline`` shadows repeat of generation (``privacy.pipeline_generation`` resolved):
    "regenerate" for ``auto`` when the method adapts LoRAs on the private data, else "relabel"."""
    choice = cfg.privacy.pipeline_generation
    if choice == "auto":
        return "regenerate" if get_method(cfg.synthesis.method).lora is not None else "relabel"
    return choice


def stage_hash(cfg: Config, stage: str, extra: Any = None) -> str:
    """Hash of exactly what ``stage``'s output depends on (see ``STAGE_INPUTS``)."""
    d = cfg.to_dict()
    if "pipeline" in cfg.privacy.shadow_modes and pipeline_generation(cfg) == "regenerate":
        d["privacy"]["pipeline_generation"] = "regenerate"  # "auto" and "regenerate" compute the same shadows
    else:  # re-labelling pipeline shadows, or none: the hashes from before the field existed
        d["privacy"].pop("pipeline_generation")
    if cfg.foundation.path is not None:  # a given model: its architecture/pretraining don't matter
        d["foundation"] = {"path": cfg.foundation.path}
    drop = list(EXECUTION_ONLY) + list(settings_left_out("execution")) + [
        k for k, methods in method_only_settings().items() if cfg.synthesis.method not in methods]
    if cfg.data.splits.holdout == 0:  # configs without a holdout keep the hashes they had before it existed
        drop.append("data.splits.holdout")
    # Likewise the data fields added with the own-data sources: at their defaults they change nothing.
    drop += [f"data.{k}" for k in DATA_FIELDS_SINCE_SOURCES if getattr(cfg.data, k) == DataConfig.model_fields[k].default]
    # Classifier fields added later: at their defaults they change nothing.
    drop += [f"{role}.input_blur" for role in ("teacher", "student") if getattr(cfg, role).input_blur is None]
    if stage == "synthesis":  # e.g. RCDM filters after synthesis (stage rcdm_filter)
        drop[:0] = settings_left_out("after_synthesis")
    if stage == "prepare":
        drop.append("data.caption")  # captions are made from the prepared images, not part of them
    # The replication index's settings matter only with index: faiss (tiled_l2's candidates only for tiled_l2).
    if cfg.replication.index == "exact":
        drop += [f"replication.{k}" for k in REPLICATION_INDEX_FIELDS]
    elif cfg.replication.metric == "cosine":
        drop += ["replication.index_candidates", "replication.index_grid", "replication.index_distance"]
    if stage == "student" and not (cfg.replication.enabled and cfg.replication.action == "drop"):
        drop.append("replication")  # flagging does not change what the Student trains on
    for dotted in drop:
        *parents, key = dotted.split(".")
        (_dig(d, ".".join(parents)) if parents else d).pop(key, None)
    parts = {key: _dig(d, key) for key in stage_inputs(stage) if _has(d, key)}
    return config_hash({"stage": stage, "inputs": parts, "extra": extra})


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key")
        elif e["type"] == "uri_credentials":  # never repeat the secret
            lines.append(f"  {path}: {e['msg']}")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` → (["a", "b"], 3); the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"--set {item!r}: bad key path {key!r}")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config as a dict; ``extends: other.yaml`` (relative to this file) is merged under it."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ValueError(f"invalid config ({path}): 'extends' cycle through {', '.join(map(str, seen))}")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"invalid config ({path}): top level must be a mapping")
    raw = loaded or {}
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ValueError(f"invalid config ({path}): extends must be a file name")
    return _merge(_read_yaml(path.parent / base, (*seen, path.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the built-in defaults when ``path`` is None), apply overrides, validate.

    A file may start from another with ``extends: <file>`` (path relative to it): its keys are
    merged over the base's, section by section.
    """
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_format_error(err, source)) from None
