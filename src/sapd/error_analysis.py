"""Where a detector's AP goes: the error part of ``<run folder>/report/`` (:mod:`sapd.run_report`).

From the ground truth and detections of one evaluation, scored by ``hotcoco``:

- ``errors.csv`` and ``errors.png``: the TIDE breakdown (Bolya et al., ECCV 2020): the AP50 gained if
  each kind of error were fixed, overall and per COCO object size. Each row: ``size`` (all, small,
  medium, large: COCO's area ranges, 32² and 96² pixels), ``error`` (:data:`ERROR_TYPES`),
  ``description``, ``dAP`` (fraction, as in ``summary.json``), ``count`` (detections or, for missed,
  ground-truth boxes of that kind) and ``AP50`` (the size's AP at IoU 0.5 that the dAPs add to).
  The six kinds: classification (right place, wrong class), localisation (right class, IoU in
  [0.1, 0.5)), both (wrong class and poorly placed), duplicate (a second detection of an object
  already found), background (IoU < 0.1 with every object) and missed (an object no detection
  covers). Two oracles follow: ``FP`` (every false positive removed) and ``FN`` (every missed
  object removed from the recall), which bound the sums of the kinds above.
- ``confusion.csv`` and ``confusion.png``: true class (rows) against predicted class (columns) at
  IoU 0.5, for the detections that the picture of the images draws (score >= the report's
  threshold); the last row and column are "background": a detection on no object, an object no
  detection finds.
- ``calibration.csv`` and ``calibration.png``: detections binned by score; per bin the mean score,
  the precision (the fraction that are true positives at IoU 0.5, area "all", 100 per image) and
  the count. A calibrated detector has precision equal to score.

:func:`bootstrap_compare` compares two sets of detections on the same images with hotcoco's image
bootstrap (``docs/statistics.md`` says what that interval covers).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
ORACLES = ("FP", "FN")
ERROR_NAMES = {
    "Cls": "classification",
    "Loc": "localisation",
    "Both": "classification and localisation",
    "Dupe": "duplicate",
    "Bkg": "background",
    "Miss": "missed",
    "FP": "every false positive (oracle)",
    "FN": "every false negative (oracle)",
}
# COCO's area ranges (pixels²): the rows of errors.csv
SIZES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}
POS_IOU = 0.5  # a true positive: IoU >= 0.5 (TIDE's and the confusion matrix's threshold)
BG_IOU = 0.1  # below this IoU with every object a false positive is "background"
CALIBRATION_BINS = 10

ERRORS_CSV = "errors.csv"
ERRORS_PNG = "errors.png"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
CALIBRATION_CSV = "calibration.csv"
CALIBRATION_PNG = "calibration.png"
ERRORS_COLUMNS = ("size", "error", "description", "dAP", "count", "AP50")
CALIBRATION_COLUMNS = ("bin_lower", "bin_upper", "mean_score", "precision", "count")
# Up to this many classes the confusion matrix's cells carry their counts.
ANNOTATED_MAX_CLASSES = 20


@dataclass
class ErrorAnalysis:
    """The error part of a report.

    Attributes:
        errors: the rows of ``errors.csv`` (:data:`ERRORS_COLUMNS`), size by size.
        confusion (UInt64[K + 1, K + 1]): counts, true class by row, predicted by column, the last of
            each being background.
        class_names: the K names of the confusion matrix's classes.
        calibration: the rows of ``calibration.csv`` (:data:`CALIBRATION_COLUMNS`).
        ece: expected calibration error (count-weighted mean of |precision - mean score|).
        score_thresh: the confusion matrix's score threshold.
    """

    errors: list[dict[str, Any]]
    confusion: np.ndarray
    class_names: list[str]
    calibration: list[dict[str, Any]]
    ece: float
    score_thresh: float | None

    def delta_ap(self, size: str = "all") -> dict[str, float]:
        return {r["error"]: r["dAP"] for r in self.errors if r["size"] == size}


# ---------------------------------------------------------------------------------- inputs
def coco_from_states(
    states: Mapping[str, Sequence[Any]],
    label_to_cat_id: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """A COCO ground-truth dict and an ``[N, 7]`` results array from torchmetrics' per-image states.

    Args:
        states: ``MeanAveragePrecision``'s lists, one entry per image (``sapd.evaluation.BOX_STATES``):
            ``detection_box``, ``detection_scores``, ``detection_labels``, ``groundtruth_box``,
            ``groundtruth_labels``, ``groundtruth_crowds``, ``groundtruth_area``; boxes as torchmetrics
            keeps them: ``[x, y, w, h]`` in pixels, whatever the metric's ``box_format``.
        label_to_cat_id: the category id of each contiguous label (default: the label itself).
        class_names: the name of each label.

    Returns:
        (ground truth with ``images`` numbered 1..n, ``categories`` and ``annotations``;
        results rows ``[image_id, x, y, w, h, score, category_id]``, hotcoco's ``load_res`` array).
    """
    num_images = len(states.get("groundtruth_box", ()))

    def cat(name: str, width: int | None = None) -> np.ndarray:
        parts = [
            np.asarray(v, dtype=np.float64).reshape(-1, width) if width else np.asarray(v).reshape(-1)
            for v in _numpy(states.get(name, ()))
        ]
        if parts:
            return np.concatenate(parts)
        return np.zeros((0, width) if width else (0,))

    def image_index(name: str) -> np.ndarray:  # the image (1..n) of each box
        sizes = [len(np.asarray(v).reshape(-1, 4)) for v in _numpy(states.get(name, ()))]
        return np.repeat(np.arange(1, len(sizes) + 1), sizes)

    gt_boxes, gt_labels = cat("groundtruth_box", 4), cat("groundtruth_labels").astype(np.int64)
    crowd = cat("groundtruth_crowds").astype(np.int64)
    area = cat("groundtruth_area").astype(np.float64)
    if len(area) != len(gt_boxes):
        area = gt_boxes[:, 2] * gt_boxes[:, 3]
    if len(crowd) != len(gt_boxes):
        crowd = np.zeros(len(gt_boxes), dtype=np.int64)
    dt_boxes, dt_scores = cat("detection_box", 4), cat("detection_scores").astype(np.float64)
    dt_labels = cat("detection_labels").astype(np.int64)

    labels_seen = np.concatenate([gt_labels, dt_labels])
    k = max(len(label_to_cat_id or ()), len(class_names or ()), int(labels_seen.max()) + 1 if len(labels_seen) else 0)
    cat_ids = np.array([label_to_cat_id[i] if label_to_cat_id and i < len(label_to_cat_id) else i for i in range(k)])
    names = [str(class_names[i]) if class_names and i < len(class_names) else str(cat_ids[i]) for i in range(k)]

    gt_image = image_index("groundtruth_box")
    annotations = [
        {"id": i + 1, "image_id": int(img), "category_id": int(c), "bbox": box, "area": float(a), "iscrowd": int(cr)}
        for i, (img, c, box, a, cr) in enumerate(zip(gt_image, cat_ids[gt_labels], gt_boxes.tolist(), area, crowd))
    ]
    gt = {
        "images": [{"id": i} for i in range(1, num_images + 1)],
        "categories": [{"id": int(c), "name": n} for c, n in zip(cat_ids, names)],
        "annotations": annotations,
    }
    results = np.column_stack([image_index("detection_box"), dt_boxes, dt_scores, cat_ids[dt_labels]])
    return gt, results.reshape(-1, 7).astype(np.float64)


def _numpy(values: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for v in values:
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.is_floating_point() and v.dtype not in (torch.float32, torch.float64):
                v = v.float()  # bf16 / fp16 states of a mixed-precision run: NumPy has no bfloat16
            v = v.numpy()
        out.append(np.asarray(v))
    return out


def _load(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]] | np.ndarray):
    import hotcoco

    coco_gt = hotcoco.COCO()
    coco_gt.dataset = dict(gt)
    if isinstance(results, np.ndarray):
        coco_dt = coco_gt.load_res(results.reshape(-1, 7).astype(np.float64))
    else:
        coco_dt = coco_gt.load_res(list(results)) if len(results) else coco_gt.load_res(np.zeros((0, 7)))
    return coco_gt, coco_dt


def _evaluator(coco_gt, coco_dt, area: tuple[float, float] | None = None, label: str = "all"):
    import hotcoco

    ev = hotcoco.COCOeval(coco_gt, coco_dt, "bbox")
    if area is not None:
        ev.params.area_rng = [list(area)]
        ev.params.area_rng_lbl = [label]
    ev.evaluate()
    return ev


# -------------------------------------------------------------------------------- analysis
def analyse(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    score_thresh: float | None = None,
    n_bins: int = CALIBRATION_BINS,
) -> ErrorAnalysis:
    """TIDE errors per size, the confusion matrix and the calibration of ``results`` against ``gt``.

    Args:
        gt: COCO ground truth (``images``, ``categories``, ``annotations`` with ``area`` and ``iscrowd``).
        results: COCO results entries, or an ``[N, 7]`` array (:func:`coco_from_states`).
        score_thresh: the confusion matrix counts detections with at least this score (None: all).
        n_bins: calibration bins of equal width in score.
    """
    coco_gt, coco_dt = _load(gt, results)
    errors: list[dict[str, Any]] = []
    overall = None
    for size, area in SIZES.items():
        ev = _evaluator(coco_gt, coco_dt, area, size)
        if size == "all":
            overall = ev
        tide = ev.tide_errors(pos_thr=POS_IOU, bg_thr=BG_IOU)
        for error in ERROR_TYPES + ORACLES:
            errors.append(
                {
                    "size": size,
                    "error": error,
                    "description": ERROR_NAMES[error],
                    "dAP": float(tide["delta_ap"][error]),
                    "count": int(tide["counts"][error]) if error in tide["counts"] else None,
                    "AP50": float(tide["ap_base"]),
                }
            )
    cm = overall.confusion_matrix(iou_thr=POS_IOU, min_score=score_thresh)
    cal = overall.calibration(n_bins=n_bins, iou_threshold=POS_IOU)
    calibration = [
        {
            "bin_lower": float(b["bin_lower"]),
            "bin_upper": float(b["bin_upper"]),
            "mean_score": float(b["avg_confidence"]) if b["count"] else math.nan,
            "precision": float(b["avg_accuracy"]) if b["count"] else math.nan,
            "count": int(b["count"]),
        }
        for b in cal["bins"]
    ]
    return ErrorAnalysis(
        errors=errors,
        confusion=np.asarray(cm["matrix"], dtype=np.uint64),
        class_names=[str(n) for n in cm["cat_names"]],
        calibration=calibration,
        ece=float(cal["ece"]),
        score_thresh=score_thresh,
    )


def bootstrap_compare(
    gt: Mapping[str, Any],
    results_a: Sequence[Mapping[str, Any]] | np.ndarray,
    results_b: Sequence[Mapping[str, Any]] | np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """B minus A on the same images, with hotcoco's image-bootstrap interval (``hotcoco.compare``).

    The images are drawn with replacement ``n_bootstrap`` times and both models are scored on each
    draw; the interval is the spread of the difference over draws. It measures how much the
    difference depends on which images were evaluated, not how much it depends on the training
    seed: two trainings of one model differ by more than this interval says (docs/statistics.md).

    Returns:
        ``{metric: {"delta", "lower", "upper"}}`` for AP, AP50, AP75, APs, APm, APl (fractions).
    """
    import hotcoco

    coco_gt, dt_a = _load(gt, results_a)
    _, dt_b = _load(gt, results_b)
    ev_a, ev_b = _evaluator(coco_gt, dt_a), _evaluator(coco_gt, dt_b)
    for ev in (ev_a, ev_b):
        ev.accumulate()
    out = hotcoco.compare(ev_a, ev_b, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    return {
        key: {
            "delta": float(out["deltas"][key]),
            "lower": float(out["ci"][key]["lower"]),
            "upper": float(out["ci"][key]["upper"]),
        }
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }


# ---------------------------------------------------------------------------------- files
def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def write_errors_csv(analysis: ErrorAnalysis, path: Path) -> Path:
    return _write_rows(analysis.errors, ERRORS_COLUMNS, path)


def write_calibration_csv(analysis: ErrorAnalysis, path: Path) -> Path:
    return _write_rows(analysis.calibration, CALIBRATION_COLUMNS, path)


def _write_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r[k]) for k in columns})
    return path


def write_confusion_csv(analysis: ErrorAnalysis, path: Path) -> Path:
    """One row per true class (and ``background``), one column per predicted class (and ``background``)."""
    names = [*analysis.class_names, "background"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, analysis.confusion.tolist()):
            writer.writerow([name, *row])
    return path


def read_errors_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """``{size: {error: dAP}}`` from an ``errors.csv`` (fractions; NaN for an empty cell)."""
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                value = float(r["dAP"]) if r.get("dAP") not in (None, "") else math.nan
            except ValueError:
                value = math.nan
            out.setdefault(str(r.get("size")), {})[str(r.get("error"))] = value
    return out


# ------------------------------------------------------------------------------- pictures
def _figure(width: float, height: float):
    from sapd.run_report import _figure as figure

    return figure(width, height)


def plot_errors(analysis: ErrorAnalysis, path: Path, title: str) -> Path:
    """Grouped bars: dAP (AP50 points) per error kind, one bar per object size."""
    fig = _figure(9.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(ERROR_TYPES))
    width = 0.8 / len(SIZES)
    colours = ("#08519c", "#9ecae1", "#4292c6", "#c6dbef")
    base = {r["size"]: r["AP50"] for r in analysis.errors}
    for i, size in enumerate(SIZES):
        delta = analysis.delta_ap(size)
        values = 100 * np.array([delta.get(e, math.nan) for e in ERROR_TYPES])
        ax.bar(
            x + (i - (len(SIZES) - 1) / 2) * width,
            values,
            width,
            color=colours[i % len(colours)],
            label=f"{size} (AP50 {100 * base.get(size, math.nan):.1f})",
        )
        if size == "all":
            for xi, v in zip(x, values):
                ax.text(xi + (i - (len(SIZES) - 1) / 2) * width, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [ERROR_NAMES[e].replace("classification and localisation", "both") for e in ERROR_TYPES])
    ax.set_ylabel("dAP50 if fixed (AP points)")
    ax.set_title(f"{title}\nTIDE errors at IoU {POS_IOU}, by object size", fontsize=10)
    ax.legend(fontsize=8, title="objects", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_confusion(analysis: ErrorAnalysis, path: Path, title: str) -> Path:
    """The matrix normalised by row (each true class sums to 1), counts in the cells for few classes."""
    counts = analysis.confusion.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    names = [*analysis.class_names, "background"]
    n = len(names)
    side = min(3.0 + 0.45 * n, 24.0)
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class's row")
    fontsize = 8 if n <= ANNOTATED_MAX_CLASSES + 1 else 5
    ax.set_xticks(np.arange(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(np.arange(n), names, fontsize=fontsize)
    if n <= ANNOTATED_MAX_CLASSES + 1:
        rows, cols = np.nonzero(counts)
        for r, c in zip(rows, cols):
            ax.text(
                c,
                r,
                str(int(counts[r, c])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[r, c] > 0.5 else "black",
            )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    thresh = f", score >= {analysis.score_thresh:.2f}" if analysis.score_thresh is not None else ""
    ax.set_title(f"{title}\nconfusion at IoU {POS_IOU}{thresh}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_calibration(analysis: ErrorAnalysis, path: Path, title: str) -> Path:
    """Precision against mean score per score bin, with the diagonal of a calibrated detector."""
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in analysis.calibration if r["count"]]
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="calibrated")
    if rows:
        score = np.array([r["mean_score"] for r in rows])
        precision = np.array([r["precision"] for r in rows])
        ax.plot(score, precision, "o-", color="#08519c", label="detections")
        for s, p, r in zip(score, precision, rows):
            ax.annotate(str(r["count"]), (s, p), textcoords="offset points", xytext=(4, -10), fontsize=7)
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("score (bin mean)")
    ax.set_ylabel(f"precision (true positives at IoU {POS_IOU})")
    ax.set_title(f"{title}\ncalibration: ECE {analysis.ece:.3f} (numbers: detections per bin)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
