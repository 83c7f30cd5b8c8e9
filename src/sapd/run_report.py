"""What a finished run leaves in ``<run folder>/report/``, whatever the logger.

``sapd.train`` writes it after evaluating the best checkpoint and ``sapd.evaluate`` after its pass:

- ``class_ap.csv``: one row per class: ``label``, ``category_id``, ``name``, ``AP``, ``AP50``, ``AP75``
  (fractions, as in ``summary.json``; empty for a class without ground truth) and ``num_gt`` (its
  non-crowd ground-truth boxes); ``class_ap.png``: the same as horizontal bars;
- ``pr_curves.png``: precision against recall at IoU 0.5, one line per class (a grid of small plots
  beyond :data:`SINGLE_AXES_MAX_CLASSES` classes);
- ``training_curves.png``: losses and learning rate by step, AP by epoch, from the run's
  ``metrics.csv`` (training always records one; ``sapd.evaluate`` reads the checkpoint's run's);
- ``val_images.png`` (``test_images.png`` for ``sapd.evaluate split=test``): the first images of the
  evaluated set with predicted (score >= a threshold) and true boxes;
- ``errors.csv`` / ``errors.png`` (the TIDE breakdown, overall and per object size),
  ``confusion.csv`` / ``confusion.png`` and ``calibration.csv`` / ``calibration.png``: where the AP
  is lost, from the evaluation's ground truth and detections (:mod:`sapd.error_analysis`).

Everything comes from what the evaluation already computed: COCOeval's precision array (torchmetrics'
``extended_summary``), kept by :class:`sapd.evaluation.COCOEvaluator` as :class:`ClassMetrics`. Only the
image grid runs the network again, on one batch of ``num_images`` images.

Per-class AP is COCO's: the mean of the interpolated precision over the 10 IoU thresholds and 101
recall thresholds of that class (area "all", 100 detections per image). The overall AP is the mean
of the same array over every class with ground truth, and each such class contributes the same
10 x 101 entries, so ``map`` is exactly the mean of the per-class APs over the classes with ground
truth (:meth:`ClassMetrics.mean_ap`).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sapd.api import SCORE_THRESH
from sapd.evaluation import ClassMetrics
from sapd.utils import format_percent

log = logging.getLogger(__name__)

REPORT_DIR = "report"
CLASS_CSV = "class_ap.csv"
CLASS_PNG = "class_ap.png"
PR_PNG = "pr_curves.png"
CURVES_PNG = "training_curves.png"
IMAGES_PNG = "val_images.png"
CSV_COLUMNS = ("label", "category_id", "name", "AP", "AP50", "AP75", "num_gt")
# Up to this many classes the PR curves share one axes; more get a grid of small plots.
SINGLE_AXES_MAX_CLASSES = 10


# ---------------------------------------------------------------------------------------- numbers
def pr_curve(metrics: ClassMetrics, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision of one class at IoU 0.5, as COCOeval interpolates them.

    The points are COCO's recall thresholds up to the class's largest recall, then that recall itself,
    so the curve ends where the detector stops finding objects of the class. Precision is
    non-increasing along it. Empty arrays for a class without ground truth.
    """
    rmax = float(metrics.recall50[label])
    if rmax < 0:
        return np.zeros(0), np.zeros(0)
    thresholds = metrics.rec_thresholds.double().numpy()
    precision = metrics.precision50[:, label].double().numpy()
    keep = thresholds <= rmax + 1e-9
    recall = np.append(thresholds[keep], rmax)
    precision = np.append(precision[keep], precision[keep][-1] if keep.any() else 0.0)
    return recall, precision


def class_rows(
    metrics: ClassMetrics, class_names: Sequence[str] | None = None, label_to_cat_id: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One dict per class with :data:`CSV_COLUMNS` (APs as floats, NaN without ground truth)."""
    rows = []
    for label in range(metrics.num_classes):
        rows.append(
            {
                "label": label,
                "category_id": int(label_to_cat_id[label]) if label_to_cat_id is not None else label,
                "name": _name(class_names, label),
                "AP": float(metrics.ap[label]),
                "AP50": float(metrics.ap50[label]),
                "AP75": float(metrics.ap75[label]),
                "num_gt": int(metrics.num_gt[label]),
            }
        )
    return rows


def format_class_table(rows: Sequence[Mapping[str, Any]], title: str = "Per-class AP") -> str:
    """The per-class rows as a plain-text table, APs in % (``n/a`` without ground truth)."""
    width = max([len(str(r["name"])) for r in rows] + [5])
    pct = format_percent
    lines = [title, f"{'label':>5}  {'class':<{width}} {'AP':>6} {'AP50':>6} {'AP75':>6} {'#gt':>7}"]
    for r in rows:
        aps = " ".join(pct(r[key]) for key in ("AP", "AP50", "AP75"))
        lines.append(f"{r['label']:>5}  {str(r['name']):<{width}} {aps} {r['num_gt']:>7}")
    return "\n".join(lines)


def write_class_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else _fmt(r[k])) for k in CSV_COLUMNS}
            )
    return path


def _fmt(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


def _name(class_names: Sequence[str] | None, label: int) -> str:
    return str(class_names[label]) if class_names is not None and label < len(class_names) else str(label)


# -------------------------------------------------------------------------------- training curves
Series = tuple[np.ndarray, np.ndarray, np.ndarray]  # steps, epochs, values


def read_metrics(paths: Iterable[str | Path]) -> dict[str, Series]:
    """Columns of Lightning ``metrics.csv`` files: ``{name: (steps, epochs, values)}``, empty cells dropped.

    Several files (a run and its resumption) are joined in order: of an earlier file only the rows
    before the first step of the later one are kept, so a run resumed from an earlier checkpoint shows
    the steps it actually trained.
    """
    tables: list[list[dict[str, str]]] = []
    for path in paths:
        with open(path, newline="") as fh:
            tables.append(list(csv.DictReader(fh)))
    rows: list[dict[str, str]] = []
    for i, table in enumerate(tables):
        later = [_to_float(r.get("step")) for t in tables[i + 1 :] for r in t]
        later = [s for s in later if not math.isnan(s)]
        cut = min(later) if later else math.inf
        rows.extend(r for r in table if not _to_float(r.get("step")) >= cut)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        step, epoch = _to_float(r.get("step")), _to_float(r.get("epoch"))
        for key, cell in r.items():
            if key in ("step", "epoch") or key is None:
                continue
            value = _to_float(cell)
            if not math.isnan(value):
                series.setdefault(key, []).append((step, epoch, value))
    return {k: tuple(np.array(col, dtype=np.float64) for col in zip(*v)) for k, v in series.items()}  # type: ignore[misc]


def _to_float(cell: Any) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def find_metrics_csv(run_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files Lightning's CSV logger wrote under a run folder (``csv/version_*``)."""
    run_dir = Path(run_dir)
    return sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)


# ------------------------------------------------------------------------------------- pictures
def _figure(width: float, height: float):
    """A matplotlib figure that needs no GUI backend and touches no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _class_colour(label: int) -> tuple[float, float, float]:
    from sapd.visualize import colour

    return tuple(c / 255 for c in colour(label))  # type: ignore[return-value]


def plot_class_ap(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Horizontal bars of AP and AP50 per class, best class on top."""
    shown = sorted((r for r in rows if not math.isnan(r["AP"])), key=lambda r: r["AP"])
    missing = [r for r in rows if math.isnan(r["AP"])]
    n = max(len(shown), 1)
    fig = _figure(8.0, 1.4 + 0.34 * n)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(shown))
    names = [f"{r['name']} ({r['num_gt']})" for r in shown]
    ap = np.array([100 * r["AP"] for r in shown])
    ap50 = np.array([100 * r["AP50"] for r in shown])
    ax.barh(y + 0.2, ap50, height=0.4, color="#9ecae1", label="AP50")
    ax.barh(y - 0.2, ap, height=0.4, color="#08519c", label="AP (IoU 0.50:0.95)")
    for yi, a in zip(y, ap):
        ax.text(a + 0.8, yi - 0.2, f"{a:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    ax.set_ylabel("class (ground-truth boxes)")
    mean = float(np.mean(ap)) if len(ap) else float("nan")
    note = f"; {len(missing)} without ground truth, not shown" if missing else ""
    ax.set_title(f"{title}\nmean AP {mean:.1f} over {len(shown)} classes{note}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_pr_curves(metrics: ClassMetrics, path: Path, title: str, class_names: Sequence[str] | None = None) -> Path:
    """Precision-recall curves at IoU 0.5 (:func:`pr_curve`), legend with class names and AP50."""
    labels = [k for k in range(metrics.num_classes) if float(metrics.recall50[k]) >= 0]
    single = len(labels) <= SINGLE_AXES_MAX_CLASSES
    if single:
        fig = _figure(7.5, 5.5)
        axes = [fig.add_subplot(1, 1, 1)] * max(len(labels), 1)
    else:
        cols = 5
        rows = math.ceil(len(labels) / cols)
        fig = _figure(3.0 * cols, 2.6 * rows + 0.6)
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(labels))]
    for ax, label in zip(axes, labels):
        recall, precision = pr_curve(metrics, label)
        ap50 = 100 * float(metrics.ap50[label])
        name = f"{_name(class_names, label)} ({ap50:.1f})"
        ax.plot(recall, precision, color=_class_colour(label), lw=1.8, drawstyle="steps-post", label=name)
        if not single:
            ax.set_title(f"{_name(class_names, label)}: AP50 {ap50:.1f}", fontsize=9)
            if recall[-1] <= 0:
                ax.text(0.5, 0.5, "no true positive", ha="center", va="center", color="grey", fontsize=9)
    for i, ax in enumerate(axes if not single else axes[:1]):
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if single or i % 5 == 0:
            ax.set_ylabel("precision")
        if single or i >= len(axes) - 5:
            ax.set_xlabel("recall")
    if single:
        axes[0].set_title(f"{title}\nprecision-recall at IoU 0.5", fontsize=10)
        if labels:
            axes[0].legend(loc="lower left", fontsize=8, title="class (AP50, %)", title_fontsize=8)
    else:
        fig.suptitle(f"{title}: precision-recall at IoU 0.5", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_training_curves(series: Mapping[str, Series], path: Path, title: str) -> Path:
    """Three panels: training (and validation) losses by step, learning rate by step, AP by epoch."""
    fig = _figure(15.0, 4.4)
    ax_loss, ax_lr, ax_ap = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    losses = [
        ("train/total_step", "train total"),
        ("train/cls", "train cls"),
        ("train/loc", "train loc"),
        ("train/select", "train select"),
    ]
    for key, name in losses:
        if key in series:
            steps, _, values = series[key]
            ax_loss.plot(steps, values, lw=1.2, label=name)
    if "train/total_epoch" in series:
        steps, _, values = series["train/total_epoch"]
        ax_loss.plot(steps, values, "s-", color="tab:blue", ms=5, lw=1, alpha=0.6, label="train total, epoch mean")
    if "val/loss" in series:
        steps, _, values = series["val/loss"]
        ax_loss.plot(steps, values, "ko--", ms=5, lw=1, label="val total")
    ax_loss.set_title("losses")
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel("loss")
    _legend_or_note(ax_loss, "no losses logged")

    seen: list[np.ndarray] = []
    for key in sorted(k for k in series if k.startswith("lr-")):
        steps, _, values = series[key]
        if any(len(v) == len(values) and np.allclose(v, values) for v in seen):
            continue  # parameter groups that share one learning rate: one line
        seen.append(values)
        ax_lr.plot(steps, values, lw=1.5, label=key.removeprefix("lr-"))
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _legend_or_note(ax_lr, "no learning rate logged")

    top = 0.0
    for key, name in (("val/map", "AP"), ("val/map_50", "AP50"), ("val/map_75", "AP75")):
        if key in series:
            _, epochs, values = series[key]
            ax_ap.plot(epochs + 1, 100 * values, "o-", ms=5, lw=1.5, label=name)
            top = max(top, float(np.max(100 * values)))
    ax_ap.set_ylim(0, min(100.0, max(5.0, 1.15 * top)))
    last_epoch = max(
        (float(np.nanmax(e)) for _, e, _ in series.values() if len(e) and not np.isnan(e).all()), default=0
    )
    ax_ap.set_xlim(0.5, last_epoch + 1.5)  # every epoch of the run, validated or not
    ax_ap.set_title("validation AP")
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("AP (%)")
    ax_ap.xaxis.get_major_locator().set_params(integer=True)
    _legend_or_note(ax_ap, "no validation logged")
    for ax in (ax_loss, ax_lr, ax_ap):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _legend_or_note(ax, note: str) -> None:
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")


@torch.no_grad()
def detect_first_images(module, dataset, num_images: int, size_divisor: int = 128) -> tuple[list, list, list]:
    """The first ``num_images`` items of ``dataset`` through ``module.detect`` in eval mode (one batch).

    Returns:
        the network inputs (FloatTensor[3, h, w] each, unpadded), their targets and their detections
        (original pixels, on the CPU).
    """
    from sapd.data.transforms import collate

    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not items:
        return [], [], []
    images, targets = collate(items, size_divisor=size_divisor)  # drops images skipped as bad
    if not len(targets):
        return [], [], []
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        dets = module.detect(images.to(device), targets)
    finally:
        module.train(was_training)
    dets = [{k: v.detach().cpu() for k, v in d.items()} for d in dets]
    return list(images), targets, dets


def plot_detections_grid(
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Tensor]],
    path: Path,
    *,
    score_thresh: float,
    class_names: Sequence[str] | None = None,
    title: str = "validation images",
) -> Path:
    """Images with predicted boxes (score >= ``score_thresh``, coloured and labelled) and true boxes (white)."""
    from sapd.visualize import draw_detections, unnormalize

    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(math.ceil(n / cols), 1)
    fig = _figure(4.2 * cols, 4.2 * rows + 0.7)
    for i, (image, target, det) in enumerate(zip(images, targets, detections)):
        keep = det["scores"] >= score_thresh
        pred = {k: v[keep] for k, v in det.items()}
        gt = None
        if "eval_boxes" in target:
            gt = {"boxes": target["eval_boxes"], "labels": target["eval_labels"]}
        picture = draw_detections(unnormalize(image, target), pred, class_names, ground_truth=gt)
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(picture))
        true = f", {len(gt['boxes'])} true" if gt is not None else ""
        ax.set_title(f"image {int(target['image_id'])}: {int(keep.sum())} predicted{true}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        f"{title}: predictions with score \u2265 {score_thresh:.2f} (coloured, class and score), ground truth (white)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)
    return path


# -------------------------------------------------------------------------------------- the report
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
    hotcoco's ``[N, 7]`` array: :func:`sapd.error_analysis.coco_from_states`), for the error analysis.

    A part that fails is logged as a warning and skipped: the run's results are already saved, and a
    picture must not turn a finished training into a failed one.
    """
    report = Path(out_dir) / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    prefix = f"{title}: " if title else ""

    def attempt(name: str, make) -> None:
        try:
            written[name] = make(report / name)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("report: could not write %s: %s: %s", report / name, type(exc).__name__, exc)

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


def _error_report(
    report: Path, evaluation: tuple[Mapping[str, Any], Any], score_thresh: float, prefix: str, written: dict
) -> None:
    """The error analysis's files (:mod:`sapd.error_analysis`) into ``report``; a failure is a warning."""
    from sapd import error_analysis as ea

    try:
        analysis = ea.analyse(*evaluation, score_thresh=score_thresh)
    except Exception as exc:  # noqa: BLE001 - as write_report's parts
        log.warning("report: no error analysis: %s: %s", type(exc).__name__, exc)
        return
    parts = (
        (ea.ERRORS_CSV, lambda p: ea.write_errors_csv(analysis, p)),
        (ea.ERRORS_PNG, lambda p: ea.plot_errors(analysis, p, f"{prefix}where AP50 is lost")),
        (ea.CONFUSION_CSV, lambda p: ea.write_confusion_csv(analysis, p)),
        (ea.CONFUSION_PNG, lambda p: ea.plot_confusion(analysis, p, f"{prefix}confusion matrix")),
        (ea.CALIBRATION_CSV, lambda p: ea.write_calibration_csv(analysis, p)),
        (ea.CALIBRATION_PNG, lambda p: ea.plot_calibration(analysis, p, f"{prefix}score calibration")),
    )
    for name, make in parts:
        try:
            written[name] = make(report / name)
        except Exception as exc:  # noqa: BLE001
            log.warning("report: could not write %s: %s: %s", report / name, type(exc).__name__, exc)


def evaluation_of(module) -> tuple[dict[str, Any], np.ndarray] | None:
    """The ground truth and detections of ``module``'s latest evaluation (its evaluator's result's ``states``,
    torchmetrics' per-image lists), or None when it kept none or had no ground truth."""
    from sapd.error_analysis import coco_from_states

    latest = module.evaluator.result
    states = latest.states if latest is not None else None
    if not states or not states.get("groundtruth_box"):
        return None
    return coco_from_states(states, module.label_to_cat_id, module.class_names)


def report_module(
    out_dir: str | Path,
    module,
    dataset,
    *,
    size_divisor: int = 128,
    metrics_files: Sequence[str | Path] = (),
    score_thresh: float = SCORE_THRESH,
    num_images: int = 8,
    title: str = "",
    images_file: str = IMAGES_PNG,
    class_table: bool = False,
) -> dict[str, Path]:
    """Writes ``out_dir/report/`` for ``module``'s latest evaluation and, with ``class_table``
    (``report.class_table``), prints its per-class table on stdout.

    What ``sapd.train`` (after evaluating the best checkpoint) and ``sapd.evaluate`` call; ``module``
    is a :class:`sapd.module.SAPDLitModule` (its evaluator's latest result, ``class_names``,
    ``label_to_cat_id``), ``dataset`` the evaluated one (its first ``num_images`` images are drawn).
    """
    latest = module.evaluator.result
    per_class = latest.class_metrics if latest is not None else None
    if per_class is not None and class_table:  # the command's product: on stdout
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
        score_thresh=score_thresh,
        num_images=num_images,
        title=title,
        images_file=images_file,
        evaluation=evaluation_of(module),
    )
