"""Train (or reuse) the method's LoRAs on the private split: `python jobs/adapt.py --config conf/loft.yaml`.

TCKR (one LoRA, captions first), DataDream (one per class) or LoFT (one per real image), by
``synthesis.method``: the stages its module needs, through adapt; banks already trained are
skipped on rerun.
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.methods import method_stages, methods_needing
from synthset.pipeline import print_json, run_method_stages, validate_inputs
from synthset.stages.foundation import foundation_model_path


def work(args, cfg):
    validate_inputs(cfg)
    if "adapt" not in method_stages(cfg.synthesis.method):
        raise ValueError(f"synthesis.method={cfg.synthesis.method!r} has no adaptation "
                         f"(choose {', '.join(methods_needing('loras'))})")
    with tracked_job(cfg, "adapt") as tracker:
        done = run_method_stages(cfg, foundation_model_path(cfg), not args.no_resume, tracker, until="adapt")
        print_json(done["adapt"])


if __name__ == "__main__":
    main(__doc__, work)
