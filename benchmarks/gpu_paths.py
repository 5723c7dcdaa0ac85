"""The GPU paths of the algorithms, without Ray: mixed precision, SDPA attention, determinism, throughput.

    python benchmarks/gpu_paths.py --out gpu_paths.json [--model runs/quickstart/foundation/<hash>/model]
                                   [--loras runs/quickstart/adapt/<hash>/loras.safetensors] [--quick]

Runs the platform's own plain functions (the ones the Ray actors and Ray Train workers call) on CUDA
and records, per section, what a user running on a GPU relies on:

- ``attention``: which attention processor the foundation UNet uses (``AttnProcessor2_0`` is torch's
  scaled_dot_product_attention) and how far its output is from the classic processor's in float32;
- ``foundation_training``: ``train_vae`` / ``train_unet`` steps/s (float32, as the foundation stage runs
  them) and a raw UNet fwd+bwd step in float32, TF32 and bf16 autocast at two batch sizes;
- ``generation``: ``load_generator`` + the method's ``generate_batch`` (the synthesis actor's calls) in
  float32, bfloat16 and float16: images/s at two batch sizes, NaNs, the difference of each dtype's images
  from float32's on the same seeds, whether a repeat gives the same bytes, and GPU float32 against CPU;
- ``lora``: the adapt stage's ``train_bank`` with ``adapt.use_gpu`` (the quickstart's LoCon LoRA), steps/s;
- ``actor``: the synthesis actor's own class (``ShardGenerator``, without Ray's scheduling) with one GPU,
  float32 and bfloat16: one shard written, images/s including PNG encoding;
- ``classifier``: ``fit_classifier`` (Teacher/Student recipe, input blur) steps/s;
- ``edm``: CASD's pixel UNet under ``train_steps`` in float32 and bf16 autocast (steps/s, finite losses) and
  EDM-Heun sampling images/s;
- ``replication``: ``nearest_tiled_l2`` pairs/s on the GPU and its agreement with the CPU.

Each section records its error instead of stopping the run (one device call has to cover them all).
Without CUDA, ``--quick`` runs every section at tiny sizes on the CPU: a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def quickstart_config(overrides: list[str]):
    from synthset.config import load_config

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    return load_config(os.path.join(root, "conf", "quickstart.yaml"), overrides)


def attention(ctx) -> dict:
    from diffusers.models.attention_processor import AttnProcessor

    from synthset.models.foundation import load_foundation

    device = ctx["device"]
    pipe = load_foundation(ctx["model_path"], device=device)
    unet = pipe.unet
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g).to(device)
    ids = pipe.tokenizer(["a photo of a coat"] * 16, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    t = torch.full((16,), 500, device=device)
    with torch.no_grad():
        ctx_states = pipe.text_encoder(ids)[0]
        sdpa = unet(z, t, encoder_hidden_states=ctx_states).sample
        saved = unet.attn_processors
        unet.set_attn_processor(AttnProcessor())
        classic = unet(z, t, encoder_hidden_states=ctx_states).sample
        unet.set_attn_processor(saved)
    return {"processors": names, "sdpa_vs_classic_max_abs": float((sdpa - classic).abs().max()),
            "output_max_abs": float(sdpa.abs().max())}


def foundation_training(ctx) -> dict:
    from diffusers import DDPMScheduler

    from synthset.diffusion.text_to_image import train_unet, train_vae
    from synthset.models.foundation import build_foundation

    device, quick, cfg = ctx["device"], ctx["quick"], ctx["cfg"]
    arch, pre = cfg.foundation.arch, cfg.foundation.pretrain
    pipe = build_foundation(arch, seed=0).to(device)
    steps = 3 if quick else 60
    out = {}
    x = torch.rand(4096 if not quick else 256, arch.image_channels, arch.image_size, arch.image_size, device=device) * 2 - 1
    train_vae(pipe.vae, x, 2, pre.vae_batch_size, pre.vae_lr, pre.vae_kl_weight, 0)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    train_vae(pipe.vae, x, steps, pre.vae_batch_size, pre.vae_lr, pre.vae_kl_weight, 0)
    sync(device)
    out["train_vae_steps_per_s"] = steps / (time.perf_counter() - t0)
    h = pipe.unet.config.sample_size
    latents = torch.randn(x.shape[0], arch.latent_channels, h, h, device=device)
    prompts = [f"a photo of a {c}" for c in ("coat", "shirt", "bag", "sneaker")] * (x.shape[0] // 4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    args = (pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, latents, prompts)
    train_unet(*args, 2, pre.batch_size, pre.lr, pre.prompt_dropout, 1, min_snr_gamma=pre.min_snr_gamma,
               ema_decay=pre.ema_decay)
    sync(device)
    t0 = time.perf_counter()
    losses = train_unet(*args, steps, pre.batch_size, pre.lr, pre.prompt_dropout, 1, min_snr_gamma=pre.min_snr_gamma,
                        ema_decay=pre.ema_decay)
    sync(device)
    out["train_unet_steps_per_s"] = steps / (time.perf_counter() - t0)
    out["train_unet_loss_finite"] = bool(np.isfinite(losses).all())
    out["batch"] = {"vae": pre.vae_batch_size, "unet": pre.batch_size}
    # A raw UNet + text-encoder fwd+bwd+AdamW step: what autocast or TF32 would buy the foundation stage.
    unet, te = pipe.unet, pipe.text_encoder
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()))
    raw = {}
    for batch in ([128] if quick else [128, 1024]):
        z = torch.randn(batch, arch.latent_channels, h, h, device=device)
        ids = pipe.tokenizer(["a photo of a coat"] * batch, padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        t = torch.randint(0, 1000, (batch,), device=device)
        for mode in ("float32", "tf32", "bf16_autocast"):
            if device != "cuda" and mode == "tf32":
                continue
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode == "tf32"

            def step():
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
                    loss = unet(z, t, encoder_hidden_states=te(ids)[0]).sample.float().pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

            seconds = timed(step, device, 2 if quick else 20)
            raw[f"batch{batch}_{mode}"] = {"steps_per_s": 1 / seconds, "images_per_s": batch / seconds}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    out["raw_unet_step"] = raw
    return out


def generation(ctx) -> dict:
    from synthset.methods import get_method
    from synthset.methods.class_prompt import plan_requests

    device, quick, cfg = ctx["device"], ctx["quick"], ctx["cfg"]
    method = get_method(cfg.synthesis.method if ctx["loras"] else "class_prompt")  # no LoRAs: the base model
    syn = cfg.synthesis.model_copy(update={"method": method.name})
    check = plan_requests(0, 64, 0, CLASS_NAMES, syn.prompt_template)
    out = {"method": method.name, "steps": syn.num_inference_steps, "guidance": syn.guidance_scale}
    reference = None
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if device != "cuda" and dtype_name != "float32":
            continue
        pipe = method.load_generator(ctx["model_path"], ctx["loras"], syn, device, dtype)
        row = {}
        images = method.generate_batch(pipe, check, syn)
        again = method.generate_batch(pipe, check, syn)
        row["repeat_identical"] = bool(np.array_equal(images, again))
        if reference is None:
            reference = images
        else:
            diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
            row["vs_float32_mean_abs_uint8"] = float(diff.mean())
            row["vs_float32_pixels_off_by_more_than_8"] = float((diff > 8).mean())
        for batch in ([16] if quick else [100, 1000]):
            requests = plan_requests(0, batch, 1, CLASS_NAMES, syn.prompt_template)
            syn_b = syn.model_copy(update={"batch_size": batch})
            seconds = timed(lambda: method.generate_batch(pipe, requests, syn_b), device, 1 if quick else 3)
            row[f"batch{batch}_images_per_s"] = batch / seconds
        row["all_black_or_saturated"] = bool(images.max() == 0 or images.min() == 255)
        out[dtype_name] = row
        del pipe
    if device == "cuda":
        cpu_pipe = method.load_generator(ctx["model_path"], ctx["loras"], syn, "cpu", None)
        cpu_images = method.generate_batch(cpu_pipe, check, syn)
        diff = np.abs(cpu_images.astype(np.int16) - reference.astype(np.int16))
        out["cuda_float32_vs_cpu"] = {"mean_abs_uint8": float(diff.mean()), "max_abs_uint8": int(diff.max())}
    return out


def lora(ctx) -> dict:
    """The adapt stage's ``train_bank`` with ``adapt.use_gpu``: the quickstart's LoCon LoRA on random images."""
    from synthset.stages.adapt import method_settings, train_bank

    device, quick, cfg = ctx["device"], ctx["quick"], ctx["cfg"]
    steps = 3 if quick else 100
    adapt = cfg.adapt.model_copy(update={"use_gpu": device == "cuda", "steps": steps})
    n = 256 if quick else 4096
    rng = np.random.default_rng(0)
    images = (rng.random((n, 32, 32)) * 255).astype(np.uint8)
    prompts = [f"coat: item {i % 7}" for i in range(n)]
    out_uri = os.path.join(tempfile.mkdtemp(prefix="gpu-lora-"), "bank.safetensors")
    settings = method_settings(cfg.model_copy(update={"adapt": adapt}))
    t0 = time.perf_counter()
    result = train_bank(ctx["model_path"], images, prompts, np.zeros(n, dtype=np.int64), 0, 1, settings,
                        adapt.model_dump(mode="json"), out_uri)
    return {"steps": steps, "batch": adapt.batch_per_lora, "rank": settings["rank"], "targets": settings["target_preset"],
            "steps_per_s": steps / result["seconds"], "wall_s": time.perf_counter() - t0,
            "loss_first": result["loss_first"], "loss_last": result["loss_last"]}


def actor(ctx) -> dict:
    """The synthesis actor (``ShardGenerator``, called here without Ray) with ``num_gpus: 1``: one shard."""
    from synthset.data.shards import iter_shard, shard_name
    from synthset.methods import get_method
    from synthset.stages.synthesize import ShardGenerator

    device, quick, cfg = ctx["device"], ctx["quick"], ctx["cfg"]
    count = 32 if quick else 2000
    out = {"method": "class_prompt", "images": count}
    for dtype in ("float32", "bfloat16"):
        syn = cfg.synthesis.model_copy(update={
            "method": "class_prompt", "dtype": dtype, "batch_size": 16 if quick else 500,
            "actors": cfg.synthesis.actors.model_copy(update={"num_gpus": 1 if device == "cuda" else 0})})
        dataset = os.path.join(tempfile.mkdtemp(prefix="gpu-actor-"), "data")
        t0 = time.perf_counter()
        shard_actor = ShardGenerator(ctx["model_path"], syn, get_method("class_prompt"), CLASS_NAMES, 0, dataset,
                                     "gpu-check")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shard_actor({"shard": np.array([0]), "start": np.array([0]), "stop": np.array([count])})
        seconds = time.perf_counter() - t0
        written = sum(1 for _ in iter_shard(os.path.join(dataset, shard_name(0))))
        out[dtype] = {"load_s": load_s, "images_per_s": count / seconds, "written": written,
                      "unet_dtype": str(shard_actor.generator.pipe.unet.dtype),
                      "unet_device": str(shard_actor.generator.pipe.unet.device)}
    return out


def classifier(ctx) -> dict:
    from synthset.models.classifiers import build_classifier
    from synthset.models.training import array_batches, fit_classifier

    device, quick, cfg = ctx["device"], ctx["quick"], ctx["cfg"]
    out = {}
    n = 512 if quick else 20000
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    probs = torch.softmax(torch.randn(n, 10, generator=g), 1).to(device)
    for batch in ([128] if quick else [128, 1024]):
        model = build_classifier(cfg.student, 10, 1).to(device)
        steps = n // batch

        def batches(epoch):
            return array_batches(x, y, batch, 0, epoch, probs)

        sync(device)
        t0 = time.perf_counter()
        losses = fit_classifier(model, batches, 2, steps, cfg.student.lr, 0.0, True, cfg.student.temperature,
                                True, 0)
        sync(device)
        out[f"batch{batch}"] = {"steps_per_s": 2 * steps / (time.perf_counter() - t0),
                                "loss_finite": bool(np.isfinite(losses).all())}
    return out


def edm(ctx) -> dict:
    from synthset.config import load_config
    from synthset.diffusion.edm import EDMDenoiser, heun_sample, initial_noise, karras_sigmas
    from synthset.diffusion.generator_training import TrainingSet, TrainSettings, new_state, train_steps
    from synthset.diffusion.pixel_unet import build_pixel_unet

    device, quick = ctx["device"], ctx["quick"]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cfg = load_config(os.path.join(root, "conf", "casd.yaml"))
    casd, size = cfg.synthesis.casd, cfg.data.image_size
    n = 256 if quick else 5000
    g = torch.Generator().manual_seed(0)
    data = TrainingSet(torch.rand(n, cfg.data.channels, size, size, generator=g) * 2 - 1, torch.arange(n) % 10,
                       torch.arange(n) % 2, num_classes=10)
    out = {"params_M": None}
    steps = 3 if quick else 100
    for name, autocast in (("float32", None), ("bf16_autocast", torch.bfloat16)):
        if device != "cuda" and autocast is not None:
            continue
        for batch in ([32] if quick else [32, 512]):
            torch.manual_seed(0)
            net = build_pixel_unet(casd.model, size, cfg.data.channels, num_classes=10, num_sources=2).to(device)
            out["params_M"] = sum(p.numel() for p in net.parameters()) / 1e6
            settings = TrainSettings.from_config(casd.train)
            settings = TrainSettings(batch, settings.lr, settings.warmup_steps, settings.ema_decay,
                                     settings.class_dropout, settings.max_grad_norm, settings.seed)
            state = new_state(net, settings.lr)
            train_steps(state, data, settings, 2, None, device, autocast)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            losses = train_steps(state, data, settings, 2 + steps, None, device, autocast)
            sync(device)
            out[f"train_{name}_batch{batch}"] = {"steps_per_s": steps / (time.perf_counter() - t0),
                                                 "loss_finite": bool(np.isfinite(losses).all()),
                                                 "last_losses": [round(float(v), 6) for v in losses[-3:]]}
    count = 16 if quick else 1000
    labels = (torch.arange(count) % 10).to(device)
    source = torch.zeros(count, dtype=torch.long, device=device)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)

    def sample():
        noise = initial_noise(list(range(count)), shape, device)
        return heun_sample(EDMDenoiser(net), noise, karras_sigmas(18), class_labels=labels, source=source)

    with torch.no_grad():
        seconds = timed(sample, device, 1)
    out["heun18_images_per_s"] = count / seconds
    out["heun18_batch"] = count
    return out


def replication(ctx) -> dict:
    from synthset.eval.replication import nearest_tiled_l2

    device, quick = ctx["device"], ctx["quick"]
    rng = np.random.default_rng(0)
    m, n = (64, 256) if quick else (2048, 30000)
    queries = rng.random((m, 1, 32, 32), dtype=np.float32)
    reference = rng.random((n, 1, 32, 32), dtype=np.float32)
    out = {"queries": m, "reference": n}
    nearest_tiled_l2(queries[:8], reference[:64], tile=8, device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    idx, dist = nearest_tiled_l2(queries, reference, tile=8, device=device)
    sync(device)
    out["pairs_per_s"] = m * n / (time.perf_counter() - t0)
    if device == "cuda":
        sub = slice(0, 256)
        cpu_idx, cpu_dist = nearest_tiled_l2(queries[sub], reference, tile=8, device="cpu")
        out["same_index_as_cpu"] = float((cpu_idx == idx[sub]).mean())
        out["max_rel_distance_diff"] = float(np.max(np.abs(cpu_dist - dist[sub]) / np.maximum(cpu_dist, 1e-12)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_paths.json")
    parser.add_argument("--model", default=None, help="a saved foundation pipeline; default: build the quickstart's, untrained")
    parser.add_argument("--loras", default=None, help="the method's LoRA bank (safetensors) for generation")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated sections")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    import diffusers

    from synthset.models.foundation import build_foundation

    cfg = quickstart_config([])
    model_path = args.model
    if model_path is None:
        model_path = os.path.join(tempfile.mkdtemp(prefix="gpu-paths-"), "model")
        build_foundation(cfg.foundation.arch, seed=0).save_pretrained(model_path, safe_serialization=True)
    ctx = {"device": device, "quick": quick, "cfg": cfg, "model_path": model_path, "loras": args.loras}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "quick": quick, "model": args.model, "loras": args.loras}
    sections = {"attention": attention, "foundation_training": foundation_training, "generation": generation,
                "lora": lora, "actor": actor, "classifier": classifier, "edm": edm, "replication": replication}
    wanted = args.only.split(",") if args.only else list(sections)
    for name in wanted:
        t0 = time.perf_counter()
        try:
            result[name] = sections[name](ctx)
        except Exception as exc:  # recorded, so one device call still reports the other sections
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        result[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(result[name])[:600], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
