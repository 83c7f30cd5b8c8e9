"""Tables of seeded runs: ``python -m sapd.report dirs=DIR [decide=true]`` (several folders:
``dirs='[DIR,DIR]'``; the config is ``conf/report.yaml``).

Every training run writes ``summary.json`` into its folder (its overrides, seed, model switches, COCO
table and times; :func:`sapd.train.run_summary`). This command finds them under the given folders
(a multirun folder, a results folder, several of them), groups the runs that differ only in their
seed, and prints one markdown table: mean ± sample standard deviation over seeds of AP, AP50, AP75,
APs, APm, APl (in %), the per-seed APs, the number of runs n, and minutes and seconds per step.

A row is named by its ablation (FSAF, +SW, +SW+SS, or the architecture for other detectors, e.g.
FCOS with variant "-") and by every switch that differs from the paper's setting, so runs of
different variants never mix. ``decide=true`` adds the decision rule (:func:`decisions`: does a
variant replace the default) and the goal (:func:`goals`: do the soft techniques beat FSAF, and
SAPD the peer detectors, by more than the seed noise).

Runs from different commits, data sets or budgets never share a row, and are never compared: each
summary records its commit (``commit``: the sha and whether the tree had changes) and its data
(``data``). Rows of one commit, data set and budget that share seeds are compared seed by seed
(:mod:`sapd.paired`): below the table, the per-seed differences of each setting against its FSAF
row, for AP, AP75 and each TIDE error type (the runs' ``report/errors.csv``), with their mean ± sd,
95 % t-interval and the paired seeds that a 1-point effect needs; the decision rule then works on
those differences. Summaries without a commit (written before commits were recorded) are tabled
unpaired, as before, unless ``same_commit=true`` says they come from one commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sapd.app import hydra_app
from sapd.diagnostics.error_analysis import ERROR_TYPES, ERRORS_CSV, read_errors_csv
from sapd.errors import check_run_config
from sapd.logging_setup import configure_logging
from sapd.models.criterion import paper_setting
from sapd.paired import EFFECT, Paired, format_signed, pair
from sapd.utils import TABLE_COLUMNS

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

# The paper's setting of each switch (sapd.models.SAPDCriterion's defaults); a row's variant is the
# list of switches that differ from these.
PAPER_SETTING: dict[str, Any] = paper_setting()
METRICS = TABLE_COLUMNS  # (column, COCO key): AP, AP50, AP75, APs, APm, APl
# What the paired table compares: AP, AP75 and the AP50 each TIDE error type costs (report/errors.csv)
ERROR_KEY = "dAP_"
PAIRED_METRICS = (("AP", "map"), ("AP75", "map_75"), *((f"dAP {e}", ERROR_KEY + e) for e in ERROR_TYPES))
DEFAULT_DATA = "default"  # the data label of a summary that records none (nor a data override)
ABLATION_ORDER = {"FSAF": 0, "+SW": 1, "+SS": 2, "+SW+SS": 3}
# Switches that do not change a row's computation: without SW, f := 1 (eta and its normalisation
# vanish, and sum w over positives is their number); without SS there is no top-k.
# The variant column of a detector other than SAPD (model=fcos): no SAPD switch applies to it.
PEER_VARIANT = "-"
UNUSED = {
    "FSAF": {"eta", "soft_weight_norm", "normaliser", "topk"},
    "+SW": {"topk"},
    "+SS": {"eta", "soft_weight_norm"},
}


@dataclass
class Row:
    """The runs of one configuration (all keys but the seed equal)."""

    name: str
    variant: str
    budget: str
    order: tuple
    runs: list[dict[str, Any]] = field(default_factory=list)
    data: str = DEFAULT_DATA  # the data set's label (data_identity)
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


def run_value(run: dict[str, Any], key: str) -> float:
    """A run's value of ``key`` in % (a COCO key of ``metrics``, or ``dAP_<error>`` from its errors.csv);
    NaN if it has none."""
    if key.startswith(ERROR_KEY):
        value = float(run.get("errors", {}).get(key.removeprefix(ERROR_KEY), math.nan))
        return 100 * value
    value = float(run.get("metrics", {}).get(key, -1))
    return 100 * value if value >= 0 else math.nan


def commit_name(run: dict[str, Any]) -> str | None:
    """The run's commit (12 hex digits, ``-dirty`` when the tree had changes), None when not recorded."""
    commit = run.get("commit")
    if not isinstance(commit, dict) or not commit.get("sha"):
        return None
    return str(commit["sha"])[:12] + ("-dirty" if commit.get("dirty") else "")


def data_identity(run: dict[str, Any]) -> tuple[str, str]:
    """(a key equal for runs on the same data, a short label): from the summary's ``data`` or, for a
    summary that records none, from its ``data`` overrides (none: the default data of its day)."""
    data = run.get("data")
    if isinstance(data, dict) and data:
        label = str(data.get("name") or data.get("_target_") or "data")
        synthetic = data.get("synthetic")
        if isinstance(synthetic, dict) and synthetic.get("seed") is not None:
            label += f" (seed {synthetic['seed']})"
        return json.dumps(data, sort_keys=True, default=str), label
    overrides = sorted(
        o
        for o in run.get("overrides") or ()
        if o.split("=")[0].lstrip("+~") in ("data",) or o.lstrip("+~").startswith("data.")
    )
    return json.dumps(overrides), ", ".join(overrides) or DEFAULT_DATA


def find_summaries(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``paths`` (files or folders), each with its ``path`` added, and
    ``errors`` (``{error type: dAP}``, all sizes) when its run's ``report/errors.csv`` exists."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give a run, multirun or results folder")
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY_FILE))
        for f in files:
            try:
                run = json.loads(f.read_text())
            except ValueError as exc:
                raise ValueError(f"{f} is not a run summary (not json: {exc}); delete it or rerun that run") from None
            run["path"] = str(f.parent)
            errors = f.parent / "report" / ERRORS_CSV
            if errors.is_file():
                run["errors"] = read_errors_csv(errors).get("all", {})
            runs.append(run)
    return runs


def is_sapd(model: dict[str, Any]) -> bool:
    return str(model.get("_target_") or "sapd.models.SAPD").endswith(".SAPD")


def peer_name(model: dict[str, Any]) -> str:
    """A detector other than SAPD by its class name, less a "Detector" suffix: FCOSDetector -> FCOS."""
    name = str(model.get("_target_")).rsplit(".", 1)[-1]
    return name.removesuffix("Detector") or name


def ablation_name(model: dict[str, Any]) -> str:
    """FSAF / +SW / +SS / +SW+SS from the switches, or the architecture's class name for other detectors."""
    if not is_sapd(model):
        return peer_name(model)
    sw, ss = bool(model.get("soft_weight", True)), bool(model.get("soft_select", True))
    return {(False, False): "FSAF", (True, False): "+SW", (False, True): "+SS", (True, True): "+SW+SS"}[(sw, ss)]


def variant_name(run: dict[str, Any]) -> str:
    """The switches that differ from the paper's setting and matter to the run's ablation ("paper": none)."""
    model = run.get("model", {})
    if not is_sapd(model):
        return PEER_VARIANT
    unused = UNUSED.get(ablation_name(model), set())
    parts = [f"{k}={model[k]}" for k, v in PAPER_SETTING.items() if k in model and k not in unused and model[k] != v]
    return ", ".join(parts) if parts else "paper"


def budget_name(run: dict[str, Any]) -> str:
    epochs, limit = run.get("max_epochs"), run.get("limit_train_batches")
    return f"{epochs} ep" + (f" x {limit} batches" if limit else "")


def group_runs(runs: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows of runs equal in everything that is reported but the seed, ordered variant by variant.

    Runs of different budgets, data sets or commits never share a row."""
    rows: dict[tuple, Row] = {}
    labels: dict[str, set[str]] = {}
    for run in runs:
        data_key, label = data_identity(run)
        labels.setdefault(label, set()).add(data_key)
    for run in runs:
        name, variant, budget = ablation_name(run.get("model", {})), variant_name(run), budget_name(run)
        data_key, label = data_identity(run)
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


def _context_columns(rows: Sequence[Row]) -> tuple[bool, bool]:
    """Whether the table needs a data column and a commit column (not for summaries that record neither)."""
    return any(r.data != DEFAULT_DATA for r in rows), any(r.commit is not None for r in rows)


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (AP in %; mean ± sample std over seeds)."""
    show_data, show_commit = _context_columns(rows)
    context = ["data"] * show_data + ["commit"] * show_commit
    head = ["row", "variant", "budget", *context, "n", *[m for m, _ in METRICS], "AP per seed", "min / run", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        per_seed = ", ".join(f"{v:.1f} (s{r.get('seed')})" for v, r in zip(row.values("map"), row.runs))
        minutes = [float(r["minutes"]) for r in row.runs if r.get("minutes") is not None]
        steps = [float(r["seconds_per_step"]) for r in row.runs if r.get("seconds_per_step")]
        cells = [
            row.name,
            row.variant,
            row.budget,
            *([row.data] if show_data else []),
            *([row.commit or "-"] if show_commit else []),
            str(len(row.runs)),
            *[_fmt(*row.mean_std(key)) for _, key in METRICS],
            per_seed,
            f"{statistics.fmean(minutes):.1f}" if minutes else "-",
            f"{statistics.fmean(steps):.3f}" if steps else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled_std(a: Row, b: Row, key: str = "map") -> float:
    """Pooled sample standard deviation of two rows' values (needs >= 2 runs in one of them)."""
    va, vb = a.values(key), b.values(key)
    dof = len(va) + len(vb) - 2
    if dof < 1:
        return math.nan
    ss = sum((v - statistics.fmean(va)) ** 2 for v in va) + sum((v - statistics.fmean(vb)) ** 2 for v in vb)
    return math.sqrt(ss / dof)


MIN_SEEDS = 3  # the rule decides only on rows of at least this many seeds (paired: this many shared seeds)


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


def paired_table(rows: Sequence[Row], same_commit: bool = False) -> str:
    """Each SAPD setting against its FSAF row (same commit, data and budget), seed by seed: one line per
    metric (AP, AP75, the dAP50 of each TIDE error type: negative = fewer such errors) with the
    differences, their mean ± sd, the 95 % t-interval and the paired seeds a 1-point effect needs
    (80 % power, 5 % two-sided). Empty when no two rows pair."""
    by_key = {(r.group, r.variant, r.name): r for r in rows}
    show_data, show_commit = _context_columns(rows)
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
    ]
    lines = []
    for row in rows:
        if not is_sapd(row.runs[0].get("model", {})) or row.name == "FSAF":
            continue
        fsaf = by_key.get((row.group, sibling_variant(row, soft_weight=False, soft_select=False), "FSAF"))
        if fsaf is None:
            continue
        for metric, key in PAIRED_METRICS:
            diffs = paired(fsaf, row, key, same_commit)
            if diffs is None:
                continue
            lo, hi = diffs.interval()
            need = diffs.seeds_needed()
            cells = [
                f"{row.name} - FSAF",
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


def sibling_variant(row: Row, soft_weight: bool, soft_select: bool) -> str:
    """The variant name of ``row``'s setting with the soft techniques switched as given (e.g. its FSAF
    row: switches that do not matter to FSAF drop out of the name)."""
    model = {**row.runs[0]["model"], "soft_weight": soft_weight, "soft_select": soft_select}
    return variant_name({"model": model})


def decisions(
    rows: Sequence[Row], min_seeds: int = MIN_SEEDS, reference: str = "paper", same_commit: bool = False
) -> str:
    """The rule fixed before the experiments, applied to every variant with a +SW+SS row.

    A variant becomes the default only if its +SW+SS mean AP beats the ``reference`` setting's +SW+SS
    mean at the same budget, data and commit (the paper's by default; a variant name such as
    ``soft_weight_norm=level_max`` to compare with a later default) by more than the noise, and is not
    below the FSAF row of the same variant (the FSAF row whose switches that matter to FSAF are the
    variant's). The noise: with paired seeds (rows of one recorded commit, :func:`pairable`), the 95 %
    t-interval of the mean per-seed difference must lie above 0; otherwise the gain must exceed the
    pooled standard deviation of the two rows. Each comparison needs ``min_seeds`` seeds (paired:
    shared seeds) per row; with fewer the line says "undecided". Without an FSAF row (a screening) the
    line says whether the variant beats the reference and is "not adopted". A reference row from
    another commit or data set is not compared with.
    """
    by_key = {(r.group, r.variant, r.name): r for r in rows}
    lines = []
    for row in rows:
        if row.name != "+SW+SS" or row.variant == reference:
            continue
        ref_row = by_key.get((row.group, reference, "+SW+SS"))
        fsaf_variant = sibling_variant(row, soft_weight=False, soft_select=False)
        fsaf = by_key.get((row.group, fsaf_variant, "FSAF"))
        if ref_row is None:
            elsewhere = any(r.variant == reference and r.name == "+SW+SS" and r.budget == row.budget for r in rows)
            why = (
                " (one exists from another commit or data set: runs are not compared across them)" if elsewhere else ""
            )
            where = f"- {row.variant} ({_where(row)}): no {reference} +SW+SS row at this {_context(row)}"
            lines.append(f"{where} to compare with{why}")
            continue
        mean, ref = row.mean_std("map")[0], ref_row.mean_std("map")[0]
        g = gap(ref_row, row, same_commit=same_commit)
        beats = g.clears()
        text = f"- {row.variant} ({_where(row)}): +SW+SS {mean:.1f} vs {reference} {ref:.1f}, "
        if g.diffs is None:
            text += f"gain {mean - ref:+.1f} {'>' if beats else '<='} pooled std {g.spread:.1f}"
        else:
            text += f"paired gain {g.gap:+.1f} ({g.bar()}{', above 0' if beats else ', not above 0'})"
        if fsaf is None:
            text += f"; no FSAF row of this variant ({fsaf_variant})"
            adopt = False
        else:
            fsaf_gap = gap(fsaf, row, same_commit=same_commit)
            above = fsaf_gap.gap >= 0
            if fsaf_gap.diffs is None:
                text += f"; {'not below' if above else 'below'} its FSAF row ({fsaf.mean_std('map')[0]:.1f})"
            else:
                text += f"; {'not below' if above else 'below'} its FSAF row (paired {fsaf_gap.gap:+.1f})"
            adopt = beats and above
        counts = [(r, len(r.runs)) for r in (row, ref_row, fsaf) if r is not None]
        if g.diffs is not None:  # paired: the shared seeds count
            counts = [(r, g.n) for r in (row, ref_row)]
            counts += [(fsaf, gap(fsaf, row, same_commit=same_commit).n)] if fsaf else []
        short = [(r, n) for r, n in counts if n < min_seeds]
        if short:
            seeds = ", ".join(f"{r.name} {r.variant} n={n}" for r, n in short)
            lines.append(text + f" -> undecided: the rule needs >= {min_seeds} seeds per row ({seeds})")
            continue
        lines.append(text + (" -> becomes the default" if adopt else " -> not adopted"))
    return "\n".join(lines)


def _where(row: Row) -> str:
    """A row's budget, and its data and commit when recorded: the head of its rule and goal lines."""
    parts = [row.budget]
    if row.data != DEFAULT_DATA:
        parts.append(row.data)
    if row.commit is not None:
        parts.append(row.commit)
    return ", ".join(parts)


def _context(row: Row) -> str:
    return "budget" if row.data == DEFAULT_DATA and row.commit is None else "budget, data and commit"


SS_MARGIN = 1.0  # AP that +SW+SS must gain over FSAF for the goal


def _gap(a: Row, b: Row) -> tuple[float, float]:
    """Mean AP of ``a`` minus that of ``b``, and the two rows' pooled standard deviation."""
    return a.mean_std("map")[0] - b.mean_std("map")[0], pooled_std(a, b)


def goals(rows: Sequence[Row], min_seeds: int = MIN_SEEDS, same_commit: bool = False) -> str:
    """Whether each SAPD setting with FSAF, +SW and +SW+SS rows reaches the project's goal at its budget.

    The goal: +SW >= FSAF and +SW+SS >= FSAF + 1.0 AP, each gap beyond the noise (paired seeds: the
    95 % t-interval of the mean difference above 0; otherwise: larger than the pooled standard
    deviation of the two rows), and +SW+SS >= every other detector (model=fcos) run at the same
    budget, data and commit. A comparison decides only when both of its rows have ``min_seeds`` seeds
    (paired: shared seeds). The goal is not met as soon as one decided comparison fails; it is met when
    every comparison is decided and met (and there is a peer); otherwise the line says "undecided".
    """
    by_key = {(r.group, r.variant, r.name): r for r in rows}
    lines = []
    incomplete = 0  # settings without their FSAF or +SW row
    for row in rows:
        if row.name != "+SW+SS":
            continue
        sw = by_key.get((row.group, sibling_variant(row, soft_weight=True, soft_select=False), "+SW"))
        fsaf = by_key.get((row.group, sibling_variant(row, soft_weight=False, soft_select=False), "FSAF"))
        peers = [r for r in rows if r.group == row.group and r.variant == PEER_VARIANT]
        head = f"- {row.variant} ({_where(row)}): "
        if sw is None or fsaf is None:
            missing = " and ".join(n for n, r in (("FSAF", fsaf), ("+SW", sw)) if r is None)
            lines.append(head + f"no {missing} row of this setting -> undecided")
            incomplete += 1
            continue
        checks = []  # (text, met, decided)
        for a, b, margin in ((sw, fsaf, 0.0), (row, fsaf, SS_MARGIN), *((row, peer, None) for peer in peers)):
            g = gap(b, a, same_commit=same_commit)
            if margin is None:  # against a peer: not below it
                met, bar = g.gap >= 0, g.bar()
            else:
                met = g.clears(margin)
                noise = "the 95 % CI above 0" if g.diffs is not None else f"> pooled std {g.spread:.1f}"
                bar = f"needs >= +{margin:.1f} and {noise}" if margin else g.bar()
                if margin and g.diffs is not None:
                    bar += f"; {g.bar()}"
            decided = (g.n if g.diffs is not None else min(len(a.runs), len(b.runs))) >= min_seeds
            state = ("met" if met else "not met") + ("" if decided else f" so far, n < {min_seeds}")
            label = f"{a.name} - {b.name}" + (" paired" if g.diffs is not None else "")
            checks.append((f"{label} {g.gap:+.1f} ({bar}): {state}", met, decided))
        parts = [text for text, _, _ in checks] + ([] if peers else [f"no peer detector at this {_context(row)}"])
        if any(decided and not met for _, met, decided in checks):
            verdict = "goal not met"
        elif all(decided for _, _, decided in checks) and peers:
            verdict = "goal met"
        else:
            short = [r for r in (fsaf, sw, row, *peers) if len(r.runs) < min_seeds]
            seeds = ", ".join(f"{r.name} {r.variant} n={len(r.runs)}" for r in short) or "a peer row"
            if not short and any(not decided for _, _, decided in checks):
                seeds = f"more shared seeds (>= {min_seeds} paired)"
            verdict = f"undecided: needs {seeds}" + (f" (>= {min_seeds} seeds per row)" if short else "")
        lines.append(head + "; ".join(parts) + f" -> {verdict}")
    if lines and incomplete == len(lines):
        # a screening of +SW+SS variants alone: one line instead of one "undecided" per variant
        return f"- no +SW+SS setting has its FSAF and +SW rows at its budget ({len(lines)} settings) -> undecided"
    return "\n".join(lines)


def report(
    paths: Sequence[str | Path], decide: bool = False, reference: str = "paper", same_commit: bool = False
) -> str:
    """The markdown table of the runs under ``paths``, the paired differences of rows that share seeds
    on one commit (:func:`paired_table`); with ``decide`` the decision rule (against the ``reference``
    variant's +SW+SS row) and the goal lines below it. ``same_commit``: summaries without a recorded
    commit count as one commit."""
    runs = find_summaries(paths)
    if not runs:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} under {', '.join(map(str, paths))}: each finished training run writes one"
        )
    rows = group_runs(runs)
    text = markdown_table(rows)
    pairs = paired_table(rows, same_commit)
    if pairs:
        text += "\n\nPaired differences (B - A per seed, same commit, data and budget; AP points, "
        text += "dAP = AP50 lost to that error type; sapd.report.paired_table):\n" + pairs
    note = unpaired_note(rows, same_commit)
    if note:
        text += "\n\n" + note
    if decide:
        text += "\n\nDecision rule (sapd.report.decisions):\n"
        text += decisions(rows, reference=reference, same_commit=same_commit) or "- no variant with a +SW+SS row"
        text += f"\n\nGoal (sapd.report.goals): +SW >= FSAF and +SW+SS >= FSAF + {SS_MARGIN:.1f} AP,"
        text += " each gap > the pooled std" + (" (paired seeds: its 95 % CI above 0)" if pairs else "")
        text += "; +SW+SS >= every peer detector:\n"
        text += goals(rows, same_commit=same_commit) or "- no +SW+SS row"
    return text


def folders(dirs: Any) -> list[str]:
    """``dirs`` of the config as a list of paths: one path (a string) or a list of them."""
    if isinstance(dirs, str | Path):
        return [str(dirs)]
    if isinstance(dirs, ListConfig | list | tuple) and dirs and all(isinstance(d, str | Path) for d in dirs):
        return [str(d) for d in dirs]
    raise ValueError(f"dirs must be a folder or a list of folders, e.g. dirs='[a,b]', got {dirs!r}")


@hydra_app("sapd.report", "report", FileNotFoundError, ValueError)
def main(cfg: DictConfig) -> None:
    """Prints the table (stdout); a missing folder, no runs or a bad ``dirs`` is one line on stderr, exit code 2."""
    configure_logging()
    if OmegaConf.is_missing(cfg, "dirs"):
        raise FileNotFoundError("give the folders to tabulate: python -m sapd.report dirs=results/table2_screen")
    check_run_config(cfg)
    text = report(
        folders(cfg.dirs),
        decide=bool(cfg.decide),
        reference=str(cfg.reference),
        same_commit=bool(cfg.get("same_commit", False)),
    )
    print(text)


if __name__ == "__main__":
    main()
