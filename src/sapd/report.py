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
"""

from __future__ import annotations

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
from sapd.errors import check_run_config
from sapd.logs import configure_logging
from sapd.models.criterion import paper_setting
from sapd.utils import TABLE_COLUMNS

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

# The paper's setting of each switch (sapd.models.SAPDCriterion's defaults); a row's variant is the
# list of switches that differ from these.
PAPER_SETTING: dict[str, Any] = paper_setting()
METRICS = TABLE_COLUMNS  # (column, COCO key): AP, AP50, AP75, APs, APm, APl
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

    def values(self, key: str) -> list[float]:
        # COCOeval reports -1 where a size range has no objects: not a value
        vals = (float(r.get("metrics", {}).get(key, -1)) for r in self.runs)
        return [100 * v for v in vals if v >= 0]

    def mean_std(self, key: str) -> tuple[float, float]:
        vals = self.values(key)
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def find_summaries(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``paths`` (files or folders), each with its ``path`` added."""
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
    """Rows of runs equal in everything that is reported but the seed, ordered variant by variant."""
    rows: dict[tuple, Row] = {}
    for run in runs:
        name, variant, budget = ablation_name(run.get("model", {})), variant_name(run), budget_name(run)
        key = (budget, variant, name)
        if key not in rows:  # the paper's setting, then variants by name (FSAF, +SW, +SW+SS within), then peers
            rank = 2 if variant == PEER_VARIANT else int(variant != "paper")
            order = (budget, rank, variant, ABLATION_ORDER.get(name, len(ABLATION_ORDER)), name)
            rows[key] = Row(name=name, variant=variant, budget=budget, order=order)
        rows[key].runs.append(run)
    for row in rows.values():
        row.runs.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
    return sorted(rows.values(), key=lambda r: r.order)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (AP in %; mean ± sample std over seeds)."""
    head = ["row", "variant", "budget", "n", *[m for m, _ in METRICS], "AP per seed", "min / run", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        per_seed = ", ".join(f"{v:.1f} (s{r.get('seed')})" for v, r in zip(row.values("map"), row.runs))
        minutes = [float(r["minutes"]) for r in row.runs if r.get("minutes") is not None]
        steps = [float(r["seconds_per_step"]) for r in row.runs if r.get("seconds_per_step")]
        cells = [
            row.name,
            row.variant,
            row.budget,
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


MIN_SEEDS = 3  # the rule decides only on rows of at least this many seeds


def sibling_variant(row: Row, soft_weight: bool, soft_select: bool) -> str:
    """The variant name of ``row``'s setting with the soft techniques switched as given (e.g. its FSAF
    row: switches that do not matter to FSAF drop out of the name)."""
    model = {**row.runs[0]["model"], "soft_weight": soft_weight, "soft_select": soft_select}
    return variant_name({"model": model})


def decisions(rows: Sequence[Row], min_seeds: int = MIN_SEEDS, reference: str = "paper") -> str:
    """The rule fixed before the experiments, applied to every variant with a +SW+SS row.

    A variant becomes the default only if its +SW+SS mean AP beats the ``reference`` setting's +SW+SS
    mean at the same budget (the paper's by default; a variant name such as
    ``soft_weight_norm=level_max`` to compare with a later default) by more than the pooled standard
    deviation of the two rows, and is not below the FSAF row of the same variant (the FSAF row whose
    switches that matter to FSAF are the variant's), each of the three rows with at least
    ``min_seeds`` seeds; with fewer the line says "undecided". Without an FSAF row (a screening) the
    line says whether the variant beats the reference and is "not adopted".
    """
    by_key = {(r.budget, r.variant, r.name): r for r in rows}
    lines = []
    for row in rows:
        if row.name != "+SW+SS" or row.variant == reference:
            continue
        ref_row = by_key.get((row.budget, reference, "+SW+SS"))
        fsaf_variant = sibling_variant(row, soft_weight=False, soft_select=False)
        fsaf = by_key.get((row.budget, fsaf_variant, "FSAF"))
        if ref_row is None:
            lines.append(f"- {row.variant} ({row.budget}): no {reference} +SW+SS row at this budget to compare with")
            continue
        mean, ref = row.mean_std("map")[0], ref_row.mean_std("map")[0]
        spread = pooled_std(row, ref_row)
        beats = mean - ref > spread
        text = f"- {row.variant} ({row.budget}): +SW+SS {mean:.1f} vs {reference} {ref:.1f}, gain {mean - ref:+.1f}"
        text += f" {'>' if beats else '<='} pooled std {spread:.1f}"
        if fsaf is None:
            text += f"; no FSAF row of this variant ({fsaf_variant})"
            adopt = False
        else:
            fsaf_mean = fsaf.mean_std("map")[0]
            above = mean >= fsaf_mean
            text += f"; {'not below' if above else 'below'} its FSAF row ({fsaf_mean:.1f})"
            adopt = beats and above
        short = [r for r in (row, ref_row, fsaf) if r is not None and len(r.runs) < min_seeds]
        if short:
            seeds = ", ".join(f"{r.name} {r.variant} n={len(r.runs)}" for r in short)
            lines.append(text + f" -> undecided: the rule needs >= {min_seeds} seeds per row ({seeds})")
            continue
        lines.append(text + (" -> becomes the default" if adopt else " -> not adopted"))
    return "\n".join(lines)


SS_MARGIN = 1.0  # AP that +SW+SS must gain over FSAF for the goal


def _gap(a: Row, b: Row) -> tuple[float, float]:
    """Mean AP of ``a`` minus that of ``b``, and the two rows' pooled standard deviation."""
    return a.mean_std("map")[0] - b.mean_std("map")[0], pooled_std(a, b)


def goals(rows: Sequence[Row], min_seeds: int = MIN_SEEDS) -> str:
    """Whether each SAPD setting with FSAF, +SW and +SW+SS rows reaches the project's goal at its budget.

    The goal: +SW >= FSAF and +SW+SS >= FSAF + 1.0 AP, each gap larger than the pooled standard
    deviation of the two rows, and +SW+SS >= every other detector (model=fcos) run at the same budget.
    A comparison decides only when both of its rows have ``min_seeds`` seeds. The goal is not met as
    soon as one decided comparison fails; it is met when every comparison is decided and met (and
    there is a peer); otherwise the line says "undecided".
    """
    by_key = {(r.budget, r.variant, r.name): r for r in rows}
    lines = []
    incomplete = 0  # settings without their FSAF or +SW row
    for row in rows:
        if row.name != "+SW+SS":
            continue
        sw = by_key.get((row.budget, sibling_variant(row, soft_weight=True, soft_select=False), "+SW"))
        fsaf = by_key.get((row.budget, sibling_variant(row, soft_weight=False, soft_select=False), "FSAF"))
        peers = [r for r in rows if r.budget == row.budget and r.variant == PEER_VARIANT]
        head = f"- {row.variant} ({row.budget}): "
        if sw is None or fsaf is None:
            missing = " and ".join(n for n, r in (("FSAF", fsaf), ("+SW", sw)) if r is None)
            lines.append(head + f"no {missing} row of this setting -> undecided")
            incomplete += 1
            continue
        checks = []  # (text, met, decided)
        for a, b, margin in ((sw, fsaf, 0.0), (row, fsaf, SS_MARGIN), *((row, peer, None) for peer in peers)):
            gap, spread = _gap(a, b)
            if margin is None:  # against a peer: not below it
                met, bar = gap >= 0, f"pooled std {spread:.1f}"
            else:
                met = gap >= margin and gap > spread
                bar = f"needs >= +{margin:.1f} and > pooled std {spread:.1f}" if margin else f"pooled std {spread:.1f}"
            decided = min(len(a.runs), len(b.runs)) >= min_seeds
            state = ("met" if met else "not met") + ("" if decided else f" so far, n < {min_seeds}")
            checks.append((f"{a.name} - {b.name} {gap:+.1f} ({bar}): {state}", met, decided))
        parts = [text for text, _, _ in checks] + ([] if peers else ["no peer detector at this budget"])
        if any(decided and not met for _, met, decided in checks):
            verdict = "goal not met"
        elif all(decided for _, _, decided in checks) and peers:
            verdict = "goal met"
        else:
            short = [r for r in (fsaf, sw, row, *peers) if len(r.runs) < min_seeds]
            seeds = ", ".join(f"{r.name} {r.variant} n={len(r.runs)}" for r in short) or "a peer row"
            verdict = f"undecided: needs {seeds}" + (f" (>= {min_seeds} seeds per row)" if short else "")
        lines.append(head + "; ".join(parts) + f" -> {verdict}")
    if lines and incomplete == len(lines):
        # a screening of +SW+SS variants alone: one line instead of one "undecided" per variant
        return f"- no +SW+SS setting has its FSAF and +SW rows at its budget ({len(lines)} settings) -> undecided"
    return "\n".join(lines)


def report(paths: Sequence[str | Path], decide: bool = False, reference: str = "paper") -> str:
    """The markdown table of the runs under ``paths``; with ``decide`` the decision rule (against the
    ``reference`` variant's +SW+SS row) and the goal lines below it."""
    runs = find_summaries(paths)
    if not runs:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} under {', '.join(map(str, paths))}: each finished training run writes one"
        )
    rows = group_runs(runs)
    text = markdown_table(rows)
    if decide:
        text += "\n\nDecision rule (sapd.report.decisions):\n"
        text += decisions(rows, reference=reference) or "- no variant with a +SW+SS row"
        text += f"\n\nGoal (sapd.report.goals): +SW >= FSAF and +SW+SS >= FSAF + {SS_MARGIN:.1f} AP,"
        text += " each gap > the pooled std; +SW+SS >= every peer detector:\n"
        text += goals(rows) or "- no +SW+SS row"
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
    text = report(folders(cfg.dirs), decide=bool(cfg.decide), reference=str(cfg.reference))
    print(text)


if __name__ == "__main__":
    main()
