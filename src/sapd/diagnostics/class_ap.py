"""Per-class AP of one evaluation: ``class_ap.csv``, ``class_ap.png`` and ``pr_curves.png`` of ``report/``.

Everything comes from what the evaluation already computed: COCOeval's precision array (torchmetrics'
``extended_summary``), kept by :class:`sapd.evaluation.COCOEvaluator` as :class:`ClassMetrics`.

Per-class AP is COCO's: the mean of the interpolated precision over the 10 IoU thresholds and 101
recall thresholds of that class (area "all", 100 detections per image). The overall AP is the mean
of the same array over every class with ground truth, and each such class contributes the same
10 x 101 entries, so ``map`` is exactly the mean of the per-class APs over the classes with ground
truth (:meth:`ClassMetrics.mean_ap`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sapd.diagnostics.detections import colour
from sapd.diagnostics.files import figure, write_rows
from sapd.utils import format_percent

if TYPE_CHECKING:
    from sapd.evaluation import ClassMetrics

CLASS_CSV = "class_ap.csv"
CLASS_PNG = "class_ap.png"
PR_PNG = "pr_curves.png"
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
    return write_rows(rows, CSV_COLUMNS, path)


def _name(class_names: Sequence[str] | None, label: int) -> str:
    return str(class_names[label]) if class_names is not None and label < len(class_names) else str(label)


# ------------------------------------------------------------------------------------- pictures
def _class_colour(label: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour(label))  # type: ignore[return-value]


def plot_class_ap(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Horizontal bars of AP and AP50 per class, best class on top."""
    shown = sorted((r for r in rows if not math.isnan(r["AP"])), key=lambda r: r["AP"])
    missing = [r for r in rows if math.isnan(r["AP"])]
    n = max(len(shown), 1)
    fig = figure(8.0, 1.4 + 0.34 * n)
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
        fig = figure(7.5, 5.5)
        axes = [fig.add_subplot(1, 1, 1)] * max(len(labels), 1)
    else:
        cols = 5
        rows = math.ceil(len(labels) / cols)
        fig = figure(3.0 * cols, 2.6 * rows + 0.6)
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
