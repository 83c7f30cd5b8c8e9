"""The pictures of the error analysis (:mod:`sapd.diagnostics.error_analysis`): ``errors.png``,
``confusion.png`` and ``calibration.png`` of ``report/``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sapd.diagnostics.error_analysis import ERROR_NAMES, ERROR_TYPES, POS_IOU, SIZES, ErrorAnalysis
from sapd.diagnostics.files import figure

# Up to this many classes the confusion matrix's cells carry their counts.
ANNOTATED_MAX_CLASSES = 20


def plot_errors(analysis: ErrorAnalysis, path: Path, title: str) -> Path:
    """Grouped bars: dAP (AP50 points) per error kind, one bar per object size."""
    fig = figure(9.0, 4.6)
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
    fig = figure(side + 1.5, side)
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
    fig = figure(6.0, 5.0)
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
