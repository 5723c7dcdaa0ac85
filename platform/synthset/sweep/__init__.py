"""Ray Tune sweeps over the downstream stages (``jobs/sweep.py``; docs/sweeps.md).

- ``spec``: the sweep file's schema (``conf/sweep*.yaml``), the grid of trials it expands to, and
  the validation of every trial's pipeline config before any trial starts.
- ``shared``: the stages trials share, run once before the trials: foundation, Teacher, generation
  once per distinct generator setting at the largest cardinality, smaller cardinalities written as
  prefixes of that one plan (``write_prefix_dataset``), labels and the replication gate.
- ``trial``: the function trainable: a trial's Students (Ray Train) and evaluation, metrics to Tune
  and to an MLflow child run of the sweep's parent run.
- ``driver``: ``run_sweep`` (``Tuner`` / ``Tuner.restore``), ``describe_sweep`` (the dry run).
- ``report``: the table (CSV + Markdown) and the plots, with standard errors over seeds.
"""
