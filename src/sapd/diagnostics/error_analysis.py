"""Where a detector's AP goes: the error part of ``<run folder>/report/`` (:mod:`sapd.diagnostics`).

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

The pictures are drawn by :mod:`sapd.diagnostics.error_plots`.

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

from sapd.diagnostics.files import write_rows

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
            if v.is_floating_point() and v.element_size() < 4:
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
def write_errors_csv(analysis: ErrorAnalysis, path: Path) -> Path:
    return write_rows(analysis.errors, ERRORS_COLUMNS, path)


def write_calibration_csv(analysis: ErrorAnalysis, path: Path) -> Path:
    return write_rows(analysis.calibration, CALIBRATION_COLUMNS, path)


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
