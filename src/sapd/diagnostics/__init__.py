"""What a finished run leaves in ``<run folder>/report/``, whatever the logger, and the pictures of soft
weights and level selection (``python -m sapd.analysis``).

``sapd.train`` writes ``report/`` after evaluating the best checkpoint and ``sapd.evaluate`` after its
pass, both with :func:`report_module`; each part comes from one module:

- :mod:`~sapd.diagnostics.class_ap`: ``class_ap.csv``, one row per class: ``label``, ``category_id``,
  ``name``, ``AP``, ``AP50``, ``AP75`` (fractions, as in ``summary.json``; empty for a class without
  ground truth) and ``num_gt`` (its non-crowd ground-truth boxes); ``class_ap.png``: the same as
  horizontal bars; ``pr_curves.png``: precision against recall at IoU 0.5, one line per class (a grid
  of small plots beyond ``SINGLE_AXES_MAX_CLASSES`` classes);
- :mod:`~sapd.diagnostics.training_curves`: ``training_curves.png``: losses and learning rate by step,
  AP by epoch, from the run's ``metrics.csv`` (training always records one; ``sapd.evaluate`` reads the
  checkpoint's run's);
- :mod:`~sapd.diagnostics.detections`: ``val_images.png`` (``test_images.png`` for ``sapd.evaluate
  split=test``): the first images of the evaluated set with predicted (score >= a threshold) and true
  boxes; also the labelled boxes of ``sapd.predict``, :class:`sapd.Detector` and the wandb images;
- :mod:`~sapd.diagnostics.error_analysis` (numbers and csv files) and
  :mod:`~sapd.diagnostics.error_plots` (pictures): ``errors.csv`` / ``errors.png`` (the TIDE breakdown,
  overall and per object size), ``confusion.csv`` / ``confusion.png`` and ``calibration.csv`` /
  ``calibration.png``: where the AP is lost, from the evaluation's ground truth and detections;
- :mod:`~sapd.diagnostics.report_folder`: :func:`write_report` and :func:`report_module`, which write
  the parts above; :mod:`~sapd.diagnostics.files`: the csv and figure helpers they share.

Everything comes from what the evaluation already computed; only the image grid runs the network
again, on one batch of ``num_images`` images.

:mod:`~sapd.diagnostics.soft_weights` draws the pictures of ``python -m sapd.analysis``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sapd.lazy import lazy_exports

# imported on first use, so that sapd.report reads the error types without torch and matplotlib
_LAZY = {
    "REPORT_DIR": "sapd.diagnostics.report_folder",
    "evaluation_of": "sapd.diagnostics.report_folder",
    "find_metrics_csv": "sapd.diagnostics.training_curves",
    "report_module": "sapd.diagnostics.report_folder",
    "write_report": "sapd.diagnostics.report_folder",
}

__all__ = ["REPORT_DIR", "evaluation_of", "find_metrics_csv", "report_module", "write_report"]

if TYPE_CHECKING:
    from sapd.diagnostics.report_folder import REPORT_DIR, evaluation_of, report_module, write_report
    from sapd.diagnostics.training_curves import find_metrics_csv

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
