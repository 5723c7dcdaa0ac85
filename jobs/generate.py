"""Generate the synthetic dataset into WebDataset shards: `python jobs/generate.py --config ...`.

Uses the foundation model the config names (``foundation.path``) or the pretrained embedded one
(run `jobs/pretrain_foundation.py` first, or `jobs/pipeline.py`), with the method's captioning and
LoRA adaptation first when it has them (``synthesis.method``). Complete shards (and LoRA banks)
are skipped on rerun; `--no-resume` starts over.
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, run_generation, validate_inputs
from synthset.stages.foundation import foundation_dir, foundation_model_path


def work(args, cfg):
    class_names = validate_inputs(cfg)
    if cfg.foundation.path is None and not foundation_dir(cfg).is_complete():
        raise FileNotFoundError(f"foundation model {foundation_model_path(cfg)} not found for this config: "
                                "run jobs/pretrain_foundation.py first, or set foundation.path")
    with tracked_job(cfg, "generate") as tracker:
        print_json(run_generation(cfg, class_names, not args.no_resume, tracker))


if __name__ == "__main__":
    main(__doc__, work)
