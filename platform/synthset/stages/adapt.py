"""Adapt stage: LoRAs of the foundation UNet trained on the private split (TCKR, DataDream, LoFT).

    python jobs/adapt.py --config conf/loft.yaml

Which LoRAs, of what rank, trained with which prompts, is the method's ``LoraAdaptation``
(``Method.lora`` in ``methods/<method>.py``): one LoRA over every selected private image (TCKR,
rank 4, prompts ``"{class}: {caption}"``), one per class (DataDream, rank 16) or one per image
(LoFT, rank 2), both with ``"a photo of a {class}"``.

The k shots per class (``adapt.shots_per_class``; all images when null) are a seeded choice
from the private split. LoRAs are grouped into banks of ``adapt.loras_per_bank``; each bank is
one Ray task that trains its LoRAs in one batched forward (``lora.train.train_lora_bank``) and
writes ``banks/bank-NNNN.safetensors`` atomically, so a rerun trains only the missing banks.
A single LoRA over the whole set (TCKR) is instead trained data-parallel with Ray Train when
``adapt.workers > 1``: each worker computes a share of every step and the gradients are summed
(same result).
Training a LoRA in a bank equals training it alone (tests/lora/test_lora_bank.py), so the bank size
and the number of parallel workers do not change the result. The stage ends by merging the banks
into ``loras.safetensors`` and writing ``loras.json`` (LoRA id → class, real image, caption), the
table the generation methods plan with.
"""

from __future__ import annotations

import time

import numpy as np

from synthset import storage
from synthset.config import Config
from synthset.methods import LoraAdaptation, get_method
from synthset.stages.common import StageDir


def adapt_dir(cfg: Config) -> StageDir:
    return StageDir.for_config(cfg, "adapt")


def select_shots(labels: np.ndarray, num_classes: int, k: int | None, seed: int) -> np.ndarray:
    """Positions into the private split: k per class (seeded), class by class; all when k is None."""
    rng = np.random.default_rng([seed, 0x5107])
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            raise ValueError(f"adapt: class {c} has no image in the private split")
        if k is not None and len(members) < k:
            raise ValueError(f"adapt.shots_per_class={k}, but class {c} has only {len(members)} private images")
        chosen.append(members if k is None else np.sort(rng.choice(members, size=k, replace=False)))
    return np.concatenate(chosen)


def check_shots(k: int | None, private_labels: np.ndarray, class_names: list[str]) -> None:
    """Before any work: the private split holds ``adapt.shots_per_class`` (at least one) images of every class."""
    counts = np.bincount(private_labels, minlength=len(class_names))
    short = [f"{class_names[c]} ({counts[c]})" for c in range(len(class_names)) if counts[c] < (k or 1)]
    if short:
        raise ValueError(f"adapt.shots_per_class={k}: the private split has fewer images of {', '.join(short)}")


def method_lora(cfg: Config) -> LoraAdaptation:
    """The LoRAs ``synthesis.method`` trains (its module's ``Method.lora``)."""
    lora = get_method(cfg.synthesis.method).lora
    if lora is None:
        raise ValueError(f"synthesis.method={cfg.synthesis.method!r} has no adaptation stage")
    return lora


def method_settings(cfg: Config) -> dict:
    """Rank, alpha, lr and target modules: the method's own, unless ``adapt.*`` sets them."""
    from synthset.lora.bank import resolve_targets

    lora = method_lora(cfg)
    rank = cfg.adapt.rank or lora.rank
    targets = cfg.adapt.targets or lora.targets
    return {"rank": rank, "alpha": cfg.adapt.alpha or float(rank), "lr": cfg.adapt.lr or lora.lr,
            "targets": list(resolve_targets(targets)), "target_preset": targets if isinstance(targets, str) else None}


def train_bank(model_path: str, images: np.ndarray, prompts: list[str], owner: np.ndarray, first_id: int,
               num_loras: int, settings: dict, adapt: dict, out_uri: str,
               data_parallel: tuple[int, int] | None = None) -> dict:
    """Train LoRAs ``first_id … first_id + num_loras - 1`` on their images; write the bank file.

    With ``data_parallel=(rank, world)`` (a Ray Train worker) the ranks share each step and rank 0
    writes the file."""
    import torch
    from diffusers import DDPMScheduler

    from synthset.config import AdaptConfig
    from synthset.data.splits import UnitImages
    from synthset.diffusion.text_to_image import encode_latents, encode_prompts
    from synthset.lora.bank import inject_lora_bank, save_bank
    from synthset.lora.train import train_lora_bank
    from synthset.models.foundation import load_foundation

    cfg = AdaptConfig.model_validate(adapt)
    torch.set_num_threads(cfg.cpus_per_worker)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    pipe = load_foundation(model_path, device=device)
    t0 = time.time()
    with torch.no_grad():
        # uint8 until a VAE batch of 512 reaches the device (the same batches, so the same latents, as before).
        pixels = UnitImages(images, device, pipe.vae.config.in_channels)
        latents = encode_latents(pipe.vae, pixels) * pipe.vae.config.scaling_factor
        # Each distinct prompt encoded once (TCKR over a whole private set repeats its captions).
        distinct, inverse = np.unique(np.asarray(prompts, dtype=object).astype(str), return_inverse=True)
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, distinct.tolist())[torch.as_tensor(inverse)]
    inject_lora_bank(pipe.unet, num_loras, settings["rank"], settings["alpha"], settings["targets"], seed=cfg.seed,
                     first_id=first_id)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    losses = train_lora_bank(pipe.unet, scheduler, latents, cond, owner, num_loras, cfg.steps, cfg.batch_per_lora,
                             settings["lr"], cfg.seed, cfg.min_snr_gamma, progress_every=60.0,
                             data_parallel=data_parallel)
    if data_parallel is None or data_parallel[0] == 0:
        save_bank(out_uri, pipe.unet, {"first_id": first_id, **settings})
    return {"bank": out_uri, "first_id": first_id, "num_loras": num_loras, "seconds": time.time() - t0,
            "loss_first": float(losses[: max(1, cfg.steps // 10)].mean()),
            "loss_last": float(losses[-max(1, cfg.steps // 10):].mean())}


def _data_parallel_train_loop(config: dict) -> None:
    """Ray Train worker: one share of every step of a single LoRA (TCKR; gradients summed over ranks)."""
    import ray.train

    ctx = ray.train.get_context()
    result = train_bank(**config["bank"], data_parallel=(ctx.get_world_rank(), ctx.get_world_size()))
    if ctx.get_world_rank() == 0:
        storage.write_json(config["bank"]["out_uri"] + ".json", result)


def train_bank_data_parallel(cfg: Config, stage: StageDir, bank: dict) -> dict:
    """One LoRA over the whole set (TCKR) trained data-parallel with Ray Train (``adapt.workers`` workers)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _data_parallel_train_loop, train_loop_config={"bank": bank},
        scaling_config=ScalingConfig(num_workers=cfg.adapt.workers, use_gpu=cfg.adapt.use_gpu,
                                     resources_per_worker={"CPU": cfg.adapt.cpus_per_worker}),
        run_config=RunConfig(name=f"adapt-{stage.hash}", storage_path=_ray_storage(stage)))
    trainer.fit()
    return storage.read_json(bank["out_uri"] + ".json")


def _ray_storage(stage: StageDir) -> str:
    import os

    return stage.uri if "://" in stage.uri else os.path.join(stage.uri, "ray")


def _training_set(cfg: Config, captions_path: str | None):
    """(images, labels, private positions, prompts, captions) of the selected shots."""
    from synthset.stages.prepare import load_splits
    from synthset.stages.caption import read_captions

    splits = load_splits(cfg)
    private, names = splits.private, splits.class_names
    shots = select_shots(private.labels, len(names), cfg.adapt.shots_per_class, cfg.adapt.seed)
    labels = private.labels[shots].astype(np.int64)
    captions = None
    if method_lora(cfg).prompt == "caption":  # TCKR: "{class}: {caption}" of each image
        if captions_path is None:
            raise ValueError(f"adapt: synthesis.method={cfg.synthesis.method!r} trains on caption prompts, but no "
                             "captions were given (run the caption stage first)")
        all_captions = read_captions(captions_path)
        if len(all_captions) != len(private):
            raise ValueError(f"{captions_path}: {len(all_captions)} captions for {len(private)} private images")
        captions = [all_captions[i] for i in shots]
    images = private.read(shots, cfg.data.image_size)
    prompts = shot_prompts(cfg, names, labels, captions)
    return images, labels, shots, splits.private_index[shots], prompts, captions, names


def shot_prompts(cfg: Config, class_names: list[str], labels: np.ndarray, captions: list[str] | None) -> list[str]:
    """The training prompt of each shot (classes ``labels``): ``synthesis.caption_template`` with its caption
    for a method that trains on captions (TCKR), else ``synthesis.prompt_template``."""
    if method_lora(cfg).prompt == "caption":
        if captions is None or len(captions) != len(labels):
            raise ValueError(f"adapt: synthesis.method={cfg.synthesis.method!r} trains on caption prompts: "
                             f"one caption per shot needed")
        return [cfg.synthesis.caption_template.format(**{"class": class_names[c], "caption": t})
                for c, t in zip(labels, captions)]
    return [cfg.synthesis.prompt_template.format(**{"class": class_names[c]}) for c in labels]


def bank_ranges(num_loras: int, per_bank: int) -> list[tuple[int, int]]:
    """(first LoRA id, number of LoRAs) of each bank of at most ``per_bank`` (``adapt.loras_per_bank``)."""
    return [(first, min(per_bank, num_loras - first)) for first in range(0, num_loras, per_bank)]


def bank_inputs(images: np.ndarray, prompts: list[str], owner: np.ndarray, first: int, n: int):
    """The shots of the bank holding LoRAs ``first`` … ``first + n - 1``: (images, prompts, owner within the bank),
    ``train_bank``'s first three data arguments."""
    members = np.flatnonzero((owner >= first) & (owner < first + n))
    return images[members], [prompts[i] for i in members], owner[members] - first


def run_adapt(cfg: Config, model_path: str, captions_path: str | None = None, resume: bool = True,
              tracker=None) -> dict:
    """Train the method's LoRAs; returns the summary with ``loras`` (merged bank) and ``table``."""
    import ray

    from synthset.lora.bank import load_bank, merge_banks, save_bank
    from synthset.progress import Progress

    stage = adapt_dir(cfg)
    if resume and stage.is_complete():
        return stage.reuse(stage.path("loras.safetensors"))
    method, lora = cfg.synthesis.method, method_lora(cfg)
    images, labels, positions, real_index, prompts, captions, names = _training_set(cfg, captions_path)
    owner, num_loras = lora.owners(labels)
    settings = method_settings(cfg)
    per_bank = cfg.adapt.loras_per_bank
    stage.begin(cfg)
    banks = [{"index": b, "first_id": first, "num_loras": n, "uri": stage.path("banks", f"bank-{b:04d}.safetensors")}
             for b, (first, n) in enumerate(bank_ranges(num_loras, per_bank))]
    todo = [bk for bk in banks if not (resume and storage.exists(bk["uri"]))]
    print(f"[adapt] {method}: {num_loras} LoRA(s) of rank {settings['rank']} on the "
          f"{settings['target_preset'] or 'listed'} modules, {len(images)} private images, {cfg.adapt.steps} steps, "
          f"{len(banks)} bank(s), {len(banks) - len(todo)} already trained; "
          f"{cfg.adapt.workers} in parallel")
    t0 = time.time()
    remote = ray.remote(num_cpus=cfg.adapt.cpus_per_worker, num_gpus=1 if cfg.adapt.use_gpu else 0,
                        max_retries=2)(train_bank)
    pending, results = [], []
    progress = Progress("adapt", max(1, len(todo)), "banks", every=30.0)
    if lora.per == "dataset" and cfg.adapt.workers > 1 and todo:  # one LoRA: split each step across workers
        bank = {"model_path": model_path, "images": images, "prompts": prompts, "owner": owner, "first_id": 0,
                "num_loras": 1, "settings": settings, "adapt": cfg.adapt.model_dump(mode="json"),
                "out_uri": todo[0]["uri"]}
        results.append(train_bank_data_parallel(cfg, stage, bank))
        todo = []
    for bk in todo:
        if len(pending) >= cfg.adapt.workers:  # bounded: at most `workers` banks in flight
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
            progress.update(1)
        pending.append(remote.remote(model_path, *bank_inputs(images, prompts, owner, bk["first_id"], bk["num_loras"]),
                                     bk["first_id"], bk["num_loras"], settings,
                                     cfg.adapt.model_dump(mode="json"), bk["uri"]))
    for r in ray.get(pending):
        results.append(r)
        progress.update(1)
    merged = merge_banks([load_bank(bk["uri"]) for bk in banks])
    save_bank(stage.path("loras.safetensors"), merged, {"method": method, "stage_hash": stage.hash})
    table = lora_table(cfg, names, settings, owner, num_loras, labels, positions, real_index, captions)
    storage.write_json(stage.path("loras.json"), table)
    seconds = time.time() - t0
    losses = {k: float(np.mean([r[k] for r in results])) if results else None for k in ("loss_first", "loss_last")}
    if tracker is not None and results:
        tracker.log_metrics({f"adapt_{k}": v for k, v in losses.items()})
    summary = stage.complete({"loras": stage.path("loras.safetensors"), "table": stage.path("loras.json"),
                              "method": method, "num_loras": num_loras, "rank": settings["rank"],
                              "shots": len(images), "banks_trained_now": len(results), "seconds": seconds,
                              **losses})
    print(f"[adapt] {len(results)} bank(s) trained in {seconds:.0f}s → {stage.path('loras.safetensors')}")
    return summary


def lora_table(cfg: Config, class_names: list[str], settings: dict, owner: np.ndarray, num_loras: int,
               labels: np.ndarray, positions: np.ndarray, real_index: np.ndarray, captions: list[str] | None) -> dict:
    """``loras.json``: each LoRA's class (None for one LoRA over every class) and, for per-image LoRAs, its
    real image; each shot's private position, source index, class, caption and LoRA. ``owner[i]`` is the
    LoRA of shot ``i`` (``LoraAdaptation.owners``)."""
    per = method_lora(cfg).per
    loras = [{"id": int(k), "class_id": int(labels[owner == k][0]) if per != "dataset" else None,
              "real_index": int(real_index[owner == k][0]) if per == "image" else None,
              "private_position": int(positions[owner == k][0]) if per == "image" else None}
             for k in range(num_loras)]
    return {"method": cfg.synthesis.method, "class_names": class_names, **settings, "loras": loras,
            "shots": [{"private_position": int(p), "real_index": int(r), "class_id": int(c),
                       "caption": captions[i] if captions else None, "lora_id": int(owner[i])}
                      for i, (p, r, c) in enumerate(zip(positions, real_index, labels))]}


def read_lora_table(uri: str) -> dict:
    """The ``loras.json`` table the adapt stage wrote (``lora_table``)."""
    return storage.read_json(uri)
