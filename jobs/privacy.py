"""Train a config's LiRA shadow models ahead of the evaluation: `python jobs/privacy.py --config ...`.

With `data.splits.holdout > 0`: the `classifier` shadow sets (Teacher recipe, Teacher and Student
architectures), which need only the private data, so they can train while the synthetic data is
generated; `jobs/evaluate.py` then reuses them. Without a holdout: the leave-one-out LiRA of the
Teacher's recipe (metrics and ROC under `<output.root>/privacy/classifier/<hash>/`).
"""
import _path  # noqa: F401

from synthset.cli import main, tracked_job
from synthset.pipeline import print_json
from synthset.stages.privacy import train_classifier_shadows


def work(args, cfg):
    with tracked_job(cfg, "privacy"):
        print_json(train_classifier_shadows(cfg))


if __name__ == "__main__":
    main(__doc__, work)
