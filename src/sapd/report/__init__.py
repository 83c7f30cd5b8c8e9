"""Tables of seeded runs: ``python -m sapd.report dirs=DIR [decide=true]`` (several folders:
``dirs='[DIR,DIR]'``; the config is ``conf/report.yaml``).

Every training run writes ``summary.json`` into its folder (its overrides, seed, model switches, COCO
table and times; :func:`sapd.train.run_summary`). This command finds them under the given folders
(a multirun folder, a results folder, several of them), groups the runs that differ only in their
seed, and prints one markdown table: mean ± sample standard deviation over seeds of AP, AP50, AP75,
APs, APm, APl (in %), the per-seed APs, the number of runs n, and minutes and seconds per step.
Runs from different commits, data sets or budgets never share a row, and are never compared. Rows of
one commit, data set and budget that share seeds are compared seed by seed; ``decide=true`` adds the
decision rule (does a variant replace the default) and the goal (do the soft techniques beat FSAF,
and SAPD the peer detectors, by more than the seed noise). One idea a module:

- :mod:`sapd.report.summaries`: finding the runs' summaries and what identifies a run (ablation,
  variant, budget, data, commit);
- :mod:`sapd.report.table`: runs grouped into rows, and the markdown table;
- :mod:`sapd.report.seed_statistics`: paired-seed statistics (t-interval, seeds needed);
- :mod:`sapd.report.comparison`: two rows compared (paired by seed, or by means and pooled std), and
  the table of paired differences;
- :mod:`sapd.report.decision_rule`: the decision rule and the goal;
- :mod:`sapd.report.image_bootstrap`: two detection sets of one seed each compared on the same
  images (``compare='[A,B]' annotations=FILE``);
- :mod:`sapd.report.command`: the command (``conf/report.yaml``, refusals, the printed text).
"""
