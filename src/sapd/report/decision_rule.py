"""The decision rule, the paired rule and the goal (``decide=true``), fixed before the experiments.

:func:`decisions`: does a variant replace the default (its +SW+SS row beats the reference's by more
than the seed noise and is not below its FSAF row). :func:`goals`: do the soft techniques beat FSAF,
and SAPD the peer detectors, by more than the seed noise. :func:`paired_decisions`: the rule of the
paired protocol (results/README.md) on each comparison of the paired table. All compare rows of one commit, data set
and budget only, through :func:`sapd.report.comparison.gap` (paired seeds where the rows share them).
"""

from __future__ import annotations

from collections.abc import Sequence

from sapd.report.comparison import comparisons, gap, paired, reading
from sapd.report.seed_statistics import EFFECT
from sapd.report.summaries import DEFAULT_DATA, PEER_VARIANT
from sapd.report.table import Row, sibling_variant

MIN_SEEDS = 3  # the rule decides only on rows of at least this many seeds (paired: this many shared seeds)


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


def paired_decisions(rows: Sequence[Row], min_seeds: int = MIN_SEEDS, same_commit: bool = False) -> str:
    """The paired protocol's rule on the AP of each comparison of the paired table (B - A, same commit,
    data and budget, :func:`sapd.report.comparison.comparisons`): B beats A when the 95 % t-interval of
    the mean per-seed difference lies above 0, by more than :data:`EFFECT` AP when its lower end is above
    +EFFECT; A is better when it lies below 0; otherwise the question is open and the line gives the
    paired seeds an EFFECT-AP effect needs at the measured spread. Under ``min_seeds`` shared seeds the
    line says "undecided". Empty when no two rows pair."""
    lines = []
    for base, row in comparisons(rows):
        diffs = paired(base, row, "map", same_commit)
        if diffs is None or diffs.n < 2:
            continue
        lo, hi = diffs.interval()
        b, a = row.name, base.name
        text = f"- {b} - {a} ({row.variant}, {_where(row)}): AP {diffs.mean:+.1f} over {diffs.n} paired seeds, "
        text += f"95 % CI [{lo:+.1f}, {hi:+.1f}] -> "
        verdicts = {  # what the interval says (comparison.reading, one home for its thresholds)
            f"higher by > {EFFECT:.0f}": f"{b} beats {a} by more than {EFFECT:.1f} AP",
            "higher": f"{b} beats {a}, not by more than {EFFECT:.1f} AP (lower end {lo:+.1f})",
            "lower": f"{a} is better",
            "open": f"open: a {EFFECT:.1f}-AP effect needs {diffs.seeds_needed()} paired seeds at this spread",
        }
        if diffs.n < min_seeds:
            verdict = f"undecided: the rule needs >= {min_seeds} paired seeds"
        else:
            verdict = verdicts[reading("AP", diffs)]
        lines.append(text + verdict)
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
        settings = f"{len(lines)} setting" + "s" * (len(lines) > 1)
        return f"- no +SW+SS setting has its FSAF and +SW rows at its budget ({settings}) -> undecided"
    return "\n".join(lines)
