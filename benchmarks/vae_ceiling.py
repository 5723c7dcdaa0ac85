"""How much the foundation's VAE alone costs the Student: real images through a VAE trained with other settings.

    .venv/bin/python benchmarks/vae_ceiling.py --config conf/quickstart.yaml --images-per-class 200 \\
        --variant kl1e-6:foundation.pretrain.vae_kl_weight=1e-6 --variant steps1600:foundation.pretrain.vae_steps=1600

Every generator of the embedded default decodes through the foundation's VAE, so a Student trained
on *real* private images after a VAE round trip (encode → posterior mean → decode) bounds what any
method can reach with that VAE. For each ``--variant name:key=value[,key=value]`` this trains only
the VAE (``diffusion.text_to_image.train_vae``, the foundation stage's own settings and data, with the
overrides), round-trips the same real images as ``method_quality.py``'s ``real`` row, and trains the
config's Student on them (Teacher soft labels) — the ``real-vae`` row of ``method_quality.py`` for a
VAE that was never pretrained with a UNet. No UNet is trained.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from method_quality import real_run  # noqa: E402

from synthset.config import load_config  # noqa: E402


def train_variant_vae(cfg):
    """The foundation stage's VAE training (same data, shift and settings), without the UNet."""
    import torch

    from synthset.data.splits import fit_images, make_splits, to_unit_tensor
    from synthset.diffusion.text_to_image import train_vae
    from synthset.models.foundation import build_foundation

    pre, arch = cfg.foundation.pretrain, cfg.foundation.arch
    torch.set_num_threads(pre.num_cpus)
    splits = make_splits(cfg.data)
    x = to_unit_tensor(fit_images(splits.public.images, arch.image_size))
    if pre.vae_unshifted and splits.public_shift != "none":
        x = torch.cat([x, to_unit_tensor(fit_images(splits.public_unshifted.images, arch.image_size))])
    vae = build_foundation(arch, seed=pre.seed).vae
    train_vae(vae, x, pre.vae_steps, pre.vae_batch_size, pre.vae_lr, pre.vae_kl_weight, pre.seed)
    return vae.eval()


def roundtrip_psnr(cfg, vae, n: int = 1000) -> float:
    """PSNR (dB, 8-bit) of the first ``n`` private images after an encode → posterior mean → decode round trip."""
    from method_quality import vae_roundtrip

    from synthset.data.splits import fit_images, make_splits

    images = fit_images(make_splits(cfg.data).private.images[:n], cfg.data.image_size)
    mse = np.mean((vae_roundtrip(cfg, images, vae).astype(np.float64) - images.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/quickstart.yaml")
    parser.add_argument("--images-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", required=True,
                        help="name:key=value[,key=value]; name 'foundation' with no overrides measures the config's "
                             "own pretrained foundation VAE (no training)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    args = parser.parse_args()
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        # split on the commas that start a new key=, so list values such as vae_channels=[16,32] survive
        overrides = [*args.overrides, *[s for s in re.split(r",(?=[\w.]+=)", sets) if s], f"student.seed={args.seed}"]
        cfg = load_config(args.config, overrides)
        own = name == "foundation" and not sets  # the config's pretrained VAE: nothing to train
        t0 = time.time()
        if own:
            from synthset.models.foundation import load_foundation
            from synthset.stages.foundation import foundation_model_path

            vae = load_foundation(foundation_model_path(cfg)).vae.eval()
        else:
            vae = train_variant_vae(cfg)
        vae_s = time.time() - t0
        psnr = roundtrip_psnr(cfg, vae)
        row = real_run(cfg, args.images_per_class, args.seed, through_vae=True,
                       **({} if own else {"vae": vae, "vae_id": name}))
        print(json.dumps({**row, "variant": name, "overrides": overrides, "vae_train_s": round(vae_s),
                          "roundtrip_psnr_db": round(psnr, 2)}), flush=True)


if __name__ == "__main__":
    main()
