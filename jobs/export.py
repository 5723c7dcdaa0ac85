"""Publish a config's synthetic dataset only if it passes the privacy gate: `python jobs/export.py --config ...`.

Reads the replication gate's record and, with `privacy.max_auc` / `privacy.max_tpr_at_0_1pct_fpr`
set, the Students' LiRA results of `jobs/evaluate.py` for the same config; when every check passes,
copies the dataset the Students trained on to `privacy.export_to` (default
`<output.root>/export/<hash>/data`) with the verdict in its `manifest.json`. A failing verdict
publishes nothing, writes `<output.root>/export/<hash>/verdict.json` and exits with status 1.
No Ray is started: the step reads two records and copies files.
"""
import _path  # noqa: F401

from synthset.cli import main
from synthset.pipeline import print_json
from synthset.stages.export import check_export_inputs, run_export


def work(args, cfg):
    check_export_inputs(cfg)  # bad settings or missing records fail here, before MLflow or any copy
    from synthset.tracking import Tracker

    tracker = Tracker(cfg)
    with tracker.pipeline_run("export"):
        summary = run_export(cfg, not args.no_resume, tracker)
    print_json(summary)
    if not summary["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main(__doc__, work)
