"""``training_curves.png`` of ``report/``: losses and learning rate by step, AP by epoch, from the run's
``metrics.csv`` (training always records one, whatever the logger; ``sapd.evaluate`` reads the
checkpoint's run's)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sapd.diagnostics.files import figure

CURVES_PNG = "training_curves.png"
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


def plot_training_curves(series: Mapping[str, Series], path: Path, title: str) -> Path:
    """Three panels: training (and validation) losses by step, learning rate by step, AP by epoch."""
    fig = figure(15.0, 4.4)
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
