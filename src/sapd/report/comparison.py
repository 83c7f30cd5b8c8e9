"""How two rows compare: seed by seed when they may be paired, else by their means.

Rows of one commit, data set and budget that share seeds are compared seed by seed
(:mod:`sapd.report.seed_statistics`): :func:`paired_table` lists, below the table, the per-seed
differences of each setting against its FSAF row, and of +SW+SS against its +SW row, for AP, AP75,
each TIDE error type (the runs' ``report/errors.csv``) and the localisation and missed errors on
medium and large objects, with their mean ± sd, 95 % t-interval and the paired seeds that a 1-point
effect needs. :func:`gap` is what the decision rule and the goal (:mod:`sapd.report.decision_rule`)
work on: the paired differences when there are at least 2, else the difference of the means against
the rows' pooled standard deviation. Summaries without a commit (written before commits were
recorded) are compared unpaired unless ``same_commit=true`` says they come from one commit
(:func:`unpaired_note`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from sapd.diagnostics.error_analysis import ERROR_TYPES
from sapd.report.seed_statistics import EFFECT, Paired, format_signed, pair
from sapd.report.summaries import ERROR_KEY, error_key, is_sapd
from sapd.report.table import Row, context_columns, sibling_variant

# Error types and object sizes the paired table also compares per size: soft selection acts on objects
# over 32 px (COCO's medium, area 32² to 96², and large), where its effect on missed and poorly placed
# objects is read (results/README.md).
SIZED_ERRORS = ("Loc", "Miss")
SIZED_SIZES = ("medium", "large")
# What the paired table compares: AP, AP75, the AP50 each TIDE error type costs (report/errors.csv),
# then SIZED_ERRORS on SIZED_SIZES
PAIRED_METRICS = (
    ("AP", "map"),
    ("AP75", "map_75"),
    *((f"dAP {e}", ERROR_KEY + e) for e in ERROR_TYPES),
    *((f"dAP {e}, {size}", ERROR_KEY + error_key(e, size)) for e in SIZED_ERRORS for size in SIZED_SIZES),
)

ERROR_METRICS = tuple((m, key) for m, key in PAIRED_METRICS if key.startswith(ERROR_KEY))  # the dAP ones


def pooled_std(a: Row, b: Row, key: str = "map") -> float:
    """Pooled sample standard deviation of two rows' values (needs >= 2 runs in one of them)."""
    va, vb = a.values(key), b.values(key)
    dof = len(va) + len(vb) - 2
    if dof < 1:
        return math.nan
    ss = sum((v - statistics.fmean(va)) ** 2 for v in va) + sum((v - statistics.fmean(vb)) ** 2 for v in vb)
    return math.sqrt(ss / dof)


def pairable(a: Row, b: Row, same_commit: bool = False) -> bool:
    """Whether two rows may be compared seed by seed: one budget, one data set and one recorded commit
    (or, with ``same_commit``, both without a recorded commit)."""
    if a.group != b.group:
        return False
    return a.commit is not None or same_commit


def paired(a: Row, b: Row, key: str = "map", same_commit: bool = False) -> Paired | None:
    """``b - a`` per shared seed (AP points), or None when the rows may not be paired or share no seed."""
    if not pairable(a, b, same_commit):
        return None
    diffs = pair(a.by_seed(key), b.by_seed(key))
    return diffs if diffs.n else None


@dataclass
class Gap:
    """``b - a``: paired (the per-seed differences) when the rows share seeds on one commit, else of
    the means with the rows' pooled standard deviation."""

    gap: float
    spread: float  # pooled std (unpaired); sd of the differences (paired)
    n: int  # runs of the smaller row (unpaired), paired seeds (paired)
    diffs: Paired | None = None

    @property
    def lower(self) -> float:
        return self.diffs.interval()[0] if self.diffs is not None else math.nan

    def clears(self, margin: float = 0.0) -> bool:
        """At least ``margin`` and beyond the noise: above the pooled std (unpaired), or the 95 %
        t-interval of the mean paired difference above 0 (paired)."""
        if self.diffs is not None:
            return self.gap >= margin and self.lower > 0
        return self.gap >= margin and self.gap > self.spread

    def bar(self) -> str:
        if self.diffs is None:
            return f"pooled std {self.spread:.1f}"
        lo, hi = self.diffs.interval()
        return f"{self.n} paired seeds, 95 % CI [{lo:+.1f}, {hi:+.1f}]"


def gap(a: Row, b: Row, key: str = "map", same_commit: bool = False) -> Gap:
    """``b - a`` as :class:`Gap`: paired when :func:`paired` gives at least 2 differences."""
    diffs = paired(a, b, key, same_commit)
    if diffs is not None and diffs.n >= 2:
        return Gap(gap=diffs.mean, spread=diffs.sd, n=diffs.n, diffs=diffs)
    return Gap(
        gap=b.mean_std(key)[0] - a.mean_std(key)[0], spread=pooled_std(a, b, key), n=min(len(a.runs), len(b.runs))
    )


def _fmt_signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.1f}"


def comparisons(rows: Sequence[Row]) -> list[tuple[Row, Row]]:
    """The (A, B) pairs of rows the paired table compares: each SAPD setting B against its FSAF row
    (same group and variant), then each +SW+SS row against its +SW row."""
    by_key = {(r.group, r.variant, r.name): r for r in rows}
    sapd_rows = [r for r in rows if is_sapd(r.runs[0].get("model", {}))]
    out = []
    for row in sapd_rows:
        fsaf = by_key.get((row.group, sibling_variant(row, soft_weight=False, soft_select=False), "FSAF"))
        if row.name != "FSAF" and fsaf is not None:
            out.append((fsaf, row))
    for row in sapd_rows:
        sw = by_key.get((row.group, sibling_variant(row, soft_weight=True, soft_select=False), "+SW"))
        if row.name == "+SW+SS" and sw is not None:
            out.append((sw, row))
    return out


def reading(metric: str, diffs: Paired) -> str:
    """What the 95 % t-interval of ``diffs`` (B - A) says: for AP and AP75 "higher" (above 0; "higher by
    > 1" with its lower end above +EFFECT), "lower" (below 0) or "open" (it spans 0); for a dAP, where a
    negative difference is fewer errors of that type, "fewer errors", "more errors" or "open". "-" with
    fewer than 2 differences."""
    lo, hi = diffs.interval()
    if math.isnan(lo):
        return "-"
    if metric.startswith("dAP"):
        return "fewer errors" if hi < 0 else "more errors" if lo > 0 else "open"
    if lo > EFFECT:
        return f"higher by > {EFFECT:.0f}"
    return "higher" if lo > 0 else "lower" if hi < 0 else "open"


def paired_table(rows: Sequence[Row], same_commit: bool = False) -> str:
    """Each SAPD setting against its FSAF row, then each +SW+SS row against its +SW row (same commit,
    data and budget), seed by seed: one line per metric (:data:`PAIRED_METRICS`: AP, AP75, the dAP50 of
    each TIDE error type, then of localisation and missed errors on medium and large objects; a
    negative dAP difference = fewer such errors) with the differences, their mean ± sd, the 95 %
    t-interval, the paired seeds a 1-point effect needs (80 % power, 5 % two-sided) and what the
    interval says (:func:`reading`). Empty when no two rows pair."""
    show_data, show_commit = context_columns(rows)
    context = ["data"] * show_data + ["commit"] * show_commit
    head = [
        "B - A",
        "variant",
        "budget",
        *context,
        "metric",
        "n",
        "B - A per seed",
        "mean ± sd",
        "95 % CI",
        f"seeds for {EFFECT:.0f} point",
        "the CI says",
    ]
    lines = []
    for base, row in comparisons(rows):
        for metric, key in PAIRED_METRICS:
            diffs = paired(base, row, key, same_commit)
            if diffs is None:
                continue
            lo, hi = diffs.interval()
            need = diffs.seeds_needed()
            cells = [
                f"{row.name} - {base.name}",
                row.variant,
                row.budget,
                *([row.data] if show_data else []),
                *([row.commit or "-"] if show_commit else []),
                metric,
                str(diffs.n),
                format_signed(diffs.diffs, diffs.seeds),
                _fmt_signed(diffs.mean) + ("" if math.isnan(diffs.sd) else f" ± {diffs.sd:.1f}"),
                "-" if math.isnan(lo) else f"[{lo:+.1f}, {hi:+.1f}]",
                "-" if need is None else str(need),
                reading(metric, diffs),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def unpaired_note(rows: Sequence[Row], same_commit: bool = False) -> str:
    """A line when rows of one budget and data share seeds but are not paired for want of a recorded commit."""
    unrecorded = [r for r in rows if r.commit is None]
    if same_commit or len(unrecorded) < 2:
        return ""
    seeds = [{r.get("seed") for r in row.runs} for row in unrecorded]
    if not any(a & b for i, a in enumerate(seeds) for b in seeds[i + 1 :]):
        return ""
    return (
        "Runs without a recorded commit are not paired by seed (their summaries predate commit records); "
        "same_commit=true pairs them if they ran from one commit."
    )
