"""Label the synthetic dataset with the Teacher's soft labels: `python jobs/label.py --config ...`.

Needs the Teacher (`jobs/train_teacher.py`) and the synthetic dataset (`jobs/generate.py`) of the
same config; writes a labelled copy of every shard (`<key>.soft.npy`) and its manifest.
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json, validate_inputs
from synthset.stages.classifier import teacher_dir
from synthset.stages.synthesize import run_label, synthesis_dir


def work(args, cfg):
    validate_inputs(cfg)
    teacher, synthesis = teacher_dir(cfg), synthesis_dir(cfg)
    for name, stage in (("teacher", teacher), ("synthetic dataset", synthesis)):
        if not stage.is_complete():
            raise FileNotFoundError(f"{name} for this config not found at {stage.uri}: run its job first")
    with tracked_job(cfg, "label") as tracker:
        print_json(run_label(cfg, synthesis.summary()["dataset"], teacher.summary()["model"],
                             not args.no_resume, tracker))


if __name__ == "__main__":
    main(__doc__, work)
