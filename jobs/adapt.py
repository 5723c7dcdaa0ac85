"""Train (or reuse) the method's LoRAs on the private split: `python jobs/adapt.py --config conf/loft.yaml`.

TCKR (one LoRA, captions first), DataDream (one per class) or LoFT (one per real image), by
``synthesis.method``; banks already trained are skipped on rerun.
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.methods import CAPTION_METHODS, LORA_METHODS
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.adapt import run_adapt
from synthset.stages.caption import run_caption
from synthset.stages.foundation import foundation_model_path


def work(args, cfg):
    validate_inputs(cfg)
    if cfg.synthesis.method not in LORA_METHODS:
        raise ValueError(f"synthesis.method={cfg.synthesis.method!r} has no adaptation (choose {', '.join(LORA_METHODS)})")
    with tracked_job(cfg, "adapt") as tracker:
        captions = (run_caption(cfg, "private", not args.no_resume, tracker)["captions"]
                    if cfg.synthesis.method in CAPTION_METHODS else None)
        print_json(run_adapt(cfg, foundation_model_path(cfg), captions, not args.no_resume, tracker))


if __name__ == "__main__":
    main(__doc__, work)
