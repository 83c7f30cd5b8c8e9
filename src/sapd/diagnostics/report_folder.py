"""Writing ``<run folder>/report/``: :func:`report_module` (what ``sapd.train`` and ``sapd.evaluate``
call) and :func:`write_report`, each part from its module of :mod:`sapd.diagnostics`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sapd.api import SCORE_THRESH
from sapd.diagnostics import error_analysis as ea
from sapd.diagnostics import error_plots
from sapd.diagnostics.class_ap import (
    CLASS_CSV,
    CLASS_PNG,
    PR_PNG,
    class_rows,
    format_class_table,
    plot_class_ap,
    plot_pr_curves,
    write_class_csv,
)
from sapd.diagnostics.detections import IMAGES_PNG, detect_first_images, plot_detections_grid
from sapd.diagnostics.training_curves import CURVES_PNG, plot_training_curves, read_metrics

if TYPE_CHECKING:
    from sapd.evaluation import ClassMetrics

log = logging.getLogger(__name__)

REPORT_DIR = "report"


def write_report(
    out_dir: str | Path,
    *,
    class_metrics: ClassMetrics | None = None,
    class_names: Sequence[str] | None = None,
    label_to_cat_id: Sequence[int] | None = None,
    metrics_files: Sequence[str | Path] = (),
    module=None,
    dataset=None,
    size_divisor: int = 128,
    score_thresh: float = SCORE_THRESH,
    num_images: int = 8,
    title: str = "",
    images_file: str = IMAGES_PNG,
    evaluation: tuple[Mapping[str, Any], Any] | None = None,
) -> dict[str, Path]:
    """Writes ``out_dir/report/`` (the parts whose inputs are given) and returns ``{file name: path}``.

    ``evaluation`` is the evaluated ground truth (a COCO dict) and detections (COCO results entries or
    hotcoco's ``[N, 7]`` array: :func:`sapd.diagnostics.error_analysis.coco_from_states`), for the error analysis.

    A part that fails is logged as a warning and skipped: the run's results are already saved, and a
    picture must not turn a finished training into a failed one.
    """
    report = Path(out_dir) / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    prefix = f"{title}: " if title else ""

    def attempt(name: str, make) -> None:
        _write_part(report, name, make, written)

    if class_metrics is not None:
        rows = class_rows(class_metrics, class_names, label_to_cat_id)
        attempt(CLASS_CSV, lambda p: write_class_csv(rows, p))
        attempt(CLASS_PNG, lambda p: plot_class_ap(rows, p, f"{prefix}per-class AP"))
        attempt(PR_PNG, lambda p: plot_pr_curves(class_metrics, p, title or "precision-recall", class_names))
    files = [Path(f) for f in metrics_files if Path(f).is_file()]
    if files:
        attempt(CURVES_PNG, lambda p: plot_training_curves(read_metrics(files), p, f"{prefix}training curves"))
    if module is not None and dataset is not None and num_images > 0:

        def grid(p: Path) -> Path:
            images, targets, dets = detect_first_images(module, dataset, num_images, size_divisor)
            return plot_detections_grid(
                images, targets, dets, p, score_thresh=score_thresh, class_names=class_names, title=title or "images"
            )

        attempt(images_file, grid)
    if evaluation is not None:
        _error_report(report, evaluation, score_thresh, prefix, written)
    if written:
        log.info("report: %s", ", ".join(str(p) for p in written.values()))
    return written


def _write_part(report: Path, name: str, make, written: dict[str, Path]) -> None:
    """``written[name] = make(report / name)``; a failure is logged as a warning (see :func:`write_report`)."""
    try:
        written[name] = make(report / name)
    except Exception as exc:  # noqa: BLE001 - see write_report's docstring
        log.warning("report: could not write %s: %s: %s", report / name, type(exc).__name__, exc)


def _error_report(
    report: Path, evaluation: tuple[Mapping[str, Any], Any], score_thresh: float, prefix: str, written: dict
) -> None:
    """The error analysis's files (:mod:`sapd.diagnostics.error_analysis`) into ``report``; a failure is a warning."""
    try:
        analysis = ea.analyse(*evaluation, score_thresh=score_thresh)
    except Exception as exc:  # noqa: BLE001 - as write_report's parts
        log.warning("report: no error analysis: %s: %s", type(exc).__name__, exc)
        return
    parts = (
        (ea.ERRORS_CSV, lambda p: ea.write_errors_csv(analysis, p)),
        (ea.ERRORS_PNG, lambda p: error_plots.plot_errors(analysis, p, f"{prefix}where AP50 is lost")),
        (ea.CONFUSION_CSV, lambda p: ea.write_confusion_csv(analysis, p)),
        (ea.CONFUSION_PNG, lambda p: error_plots.plot_confusion(analysis, p, f"{prefix}confusion matrix")),
        (ea.CALIBRATION_CSV, lambda p: ea.write_calibration_csv(analysis, p)),
        (ea.CALIBRATION_PNG, lambda p: error_plots.plot_calibration(analysis, p, f"{prefix}score calibration")),
    )
    for name, make in parts:
        _write_part(report, name, make, written)


def evaluation_of(module) -> tuple[dict[str, Any], np.ndarray] | None:
    """The ground truth and detections of ``module``'s latest evaluation (its evaluator's result's ``states``,
    torchmetrics' per-image lists), or None when it kept none or had no ground truth."""
    latest = module.evaluator.result
    states = latest.states if latest is not None else None
    if not states or not states.get("groundtruth_box"):
        return None
    return ea.coco_from_states(states, module.label_to_cat_id, module.class_names)


def report_module(
    out_dir: str | Path,
    module,
    dataset,
    settings: Mapping[str, Any] | None = None,
    *,
    size_divisor: int = 128,
    metrics_files: Sequence[str | Path] = (),
    title: str = "",
    images_file: str = IMAGES_PNG,
) -> dict[str, Path]:
    """Writes ``out_dir/report/`` for ``module``'s latest evaluation and, with ``class_table``, prints
    its per-class table on stdout.

    What ``sapd.train`` (after evaluating the best checkpoint) and ``sapd.evaluate`` call; ``module``
    is a :class:`sapd.module.SAPDLitModule` (its evaluator's latest result, ``class_names``,
    ``label_to_cat_id``), ``dataset`` the evaluated one. ``settings`` is the commands' ``report:``
    block (conf/run_report): ``score_thresh`` (boxes drawn from this score up), ``num_images`` (the
    first images of ``dataset`` drawn) and ``class_table``.
    """
    settings = settings or {}
    latest = module.evaluator.result
    per_class = latest.class_metrics if latest is not None else None
    if per_class is not None and settings.get("class_table", False):  # the command's product: on stdout
        rows = class_rows(per_class, module.class_names, module.label_to_cat_id)
        print("\n" + format_class_table(rows, title=f"Per-class AP (%), {title}" if title else "Per-class AP (%)"))
    return write_report(
        out_dir,
        class_metrics=per_class,
        class_names=module.class_names,
        label_to_cat_id=module.label_to_cat_id,
        metrics_files=metrics_files,
        module=module,
        dataset=dataset,
        size_divisor=size_divisor,
        score_thresh=float(settings.get("score_thresh", SCORE_THRESH)),
        num_images=int(settings.get("num_images", 8)),
        title=title,
        images_file=images_file,
        evaluation=evaluation_of(module),
    )
