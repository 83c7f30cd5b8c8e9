"""The rows of the table and the table itself: runs that differ only in their seed form one row, printed
as one markdown table of mean ± sample standard deviation over seeds of AP, AP50, AP75, APs, APm, APl
(in %), the per-seed APs, the number of runs n, and minutes and seconds per step.

A row is named by its ablation (FSAF, +SW, +SW+SS, or the architecture for other detectors, e.g. FCOS
with variant "-") and by every switch that differs from the paper's setting
(:mod:`sapd.report.summaries`), so runs of different variants never mix; runs of different budgets,
data sets or commits never share a row.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sapd.report.summaries import (
    DEFAULT_DATA,
    PEER_VARIANT,
    ablation_name,
    budget_name,
    commit_name,
    data_key_and_label,
    run_value,
    variant_name,
)
from sapd.utils import TABLE_COLUMNS

METRICS = TABLE_COLUMNS  # (column, COCO key): AP, AP50, AP75, APs, APm, APl
ABLATION_ORDER = {"FSAF": 0, "+SW": 1, "+SS": 2, "+SW+SS": 3}


@dataclass
class Row:
    """The runs of one configuration (all keys but the seed equal)."""

    name: str
    variant: str
    budget: str
    order: tuple
    runs: list[dict[str, Any]] = field(default_factory=list)
    data: str = DEFAULT_DATA  # the data set's label (summaries.data_key_and_label)
    commit: str | None = None  # the commit the runs ran from (None: not recorded)
    group: tuple = ()  # (budget, data, commit): rows compared with one another share it

    def values(self, key: str) -> list[float]:
        # COCOeval reports -1 where a size range has no objects: not a value
        vals = (run_value(r, key) for r in self.runs)
        return [v for v in vals if not math.isnan(v)]

    def by_seed(self, key: str) -> dict[Any, float]:
        """``{seed: value}`` of the seeds that occur once in the row (a repeated seed cannot be paired)."""
        seeds = [r.get("seed") for r in self.runs]
        out = {}
        for run, seed in zip(self.runs, seeds):
            value = run_value(run, key)
            if seed is not None and seeds.count(seed) == 1 and not math.isnan(value):
                out[seed] = value
        return out

    def mean_std(self, key: str) -> tuple[float, float]:
        vals = self.values(key)
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def group_runs(runs: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows of runs equal in everything that is reported but the seed, ordered variant by variant.

    Runs of different budgets, data sets or commits never share a row."""
    rows: dict[tuple, Row] = {}
    labels: dict[str, set[str]] = {}
    for run in runs:
        data_key, label = data_key_and_label(run)
        labels.setdefault(label, set()).add(data_key)
    for run in runs:
        name, variant, budget = ablation_name(run.get("model", {})), variant_name(run), budget_name(run)
        data_key, label = data_key_and_label(run)
        if len(labels[label]) > 1:  # two data sets of one label: tell them apart
            label += " #" + hashlib.sha1(data_key.encode()).hexdigest()[:6]
        commit = commit_name(run)
        key = (budget, data_key, commit, variant, name)
        if key not in rows:  # the paper's setting, then variants by name (FSAF, +SW, +SW+SS within), then peers
            rank = 2 if variant == PEER_VARIANT else int(variant != "paper")
            order = (budget, label, commit or "", rank, variant, ABLATION_ORDER.get(name, len(ABLATION_ORDER)), name)
            group = (budget, data_key, commit)
            rows[key] = Row(
                name=name, variant=variant, budget=budget, order=order, data=label, commit=commit, group=group
            )
        rows[key].runs.append(run)
    for row in rows.values():
        row.runs.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
    return sorted(rows.values(), key=lambda r: r.order)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def context_columns(rows: Sequence[Row]) -> tuple[bool, bool]:
    """Whether the table needs a data column and a commit column (not for summaries that record neither)."""
    return any(r.data != DEFAULT_DATA for r in rows), any(r.commit is not None for r in rows)


def _row_cells(row: Row, show_data: bool, show_commit: bool) -> list[str]:
    """The cells that name a row: row, variant, budget, and data and commit when the table shows them."""
    cells = [row.name, row.variant, row.budget]
    if show_data:
        cells.append(row.data)
    if show_commit:
        cells.append(row.commit or "-")
    return cells


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (AP in %; mean ± sample std over seeds)."""
    show_data, show_commit = context_columns(rows)
    context = ["data"] * show_data + ["commit"] * show_commit
    head = ["row", "variant", "budget", *context, "n", *[m for m, _ in METRICS], "AP per seed", "min / run", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        per_seed = ", ".join(f"{v:.1f} (s{r.get('seed')})" for v, r in zip(row.values("map"), row.runs))
        minutes = [float(r["minutes"]) for r in row.runs if r.get("minutes") is not None]
        steps = [float(r["seconds_per_step"]) for r in row.runs if r.get("seconds_per_step")]
        cells = [
            *_row_cells(row, show_data, show_commit),
            str(len(row.runs)),
            *[_fmt(*row.mean_std(key)) for _, key in METRICS],
            per_seed,
            f"{statistics.fmean(minutes):.1f}" if minutes else "-",
            f"{statistics.fmean(steps):.3f}" if steps else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_table(rows: Sequence[Row], metrics: Sequence[tuple[str, str]]) -> str:
    """The TIDE breakdown of each row: for each ``(column, key)`` of ``metrics`` (``dAP_<error>[@<size>]``
    keys, :func:`sapd.report.summaries.run_value`) the mean ± sample std over the row's runs that have a
    ``report/errors.csv``, whose number is the ``n`` column. Rows without one are left out; empty when no
    row has one."""
    show_data, show_commit = context_columns(rows)
    context = ["data"] * show_data + ["commit"] * show_commit
    head = ["row", "variant", "budget", *context, "n", *[m.removeprefix("dAP ") for m, _ in metrics]]
    lines = []
    for row in rows:
        counted = [r for r in row.runs if "errors" in r]
        if not counted:
            continue
        cells = [
            *_row_cells(row, show_data, show_commit),
            str(len(counted)),
            *[_fmt(*row.mean_std(key)) for _, key in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def sibling_variant(row: Row, soft_weight: bool, soft_select: bool) -> str:
    """The variant name of ``row``'s setting with the soft techniques switched as given (e.g. its FSAF
    row: switches that do not matter to FSAF drop out of the name)."""
    model = {**row.runs[0]["model"], "soft_weight": soft_weight, "soft_select": soft_select}
    return variant_name({"model": model})
