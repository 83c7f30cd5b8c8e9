"""The ``sapd.report`` command: ``python -m sapd.report dirs=DIR [decide=true]`` (``conf/report.yaml``):
the table of the runs under the folders, their TIDE breakdown, the paired differences, and with ``decide=true`` the
paired rule, the decision rule and the goal lines; or, with ``compare='[A,B]' annotations=FILE``, two detection sets
compared on the same images (:mod:`sapd.report.image_bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sapd.app import hydra_app
from sapd.checks import check_config
from sapd.errors import ConfigError
from sapd.logging_setup import configure_logging
from sapd.report.comparison import ERROR_METRICS, paired_table, unpaired_note
from sapd.report.decision_rule import SS_MARGIN, decisions, goals, paired_decisions
from sapd.report.image_bootstrap import image_bootstrap
from sapd.report.seed_statistics import EFFECT
from sapd.report.summaries import SUMMARY_FILE, find_summaries
from sapd.report.table import errors_table, group_runs, markdown_table


def report(
    paths: Sequence[str | Path], decide: bool = False, reference: str = "paper", same_commit: bool = False
) -> str:
    """The markdown table of the runs under ``paths``, the TIDE breakdown of each row whose runs have
    ``report/errors.csv`` (:func:`errors_table`), the paired differences of rows that share seeds
    on one commit (:func:`paired_table`); with ``decide`` the paired rule on those comparisons, the
    decision rule (against the ``reference`` variant's +SW+SS row) and the goal lines below it.
    ``same_commit``: summaries without a recorded commit count as one commit."""
    runs = find_summaries(paths)
    if not runs:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} under {', '.join(map(str, paths))}: each finished training run writes one"
        )
    rows = group_runs(runs)
    text = markdown_table(rows)
    errors = errors_table(rows, ERROR_METRICS)
    if errors:
        text += "\n\nTIDE errors of each row (AP50 points lost to each error type, on all objects, then localisation "
        text += "and missed on medium and large objects; mean ± std over the runs with report/errors.csv; "
        text += "sapd.report.table.errors_table):\n" + errors
    pairs = paired_table(rows, same_commit)
    if pairs:
        text += "\n\nPaired differences (B - A per seed, same commit, data and budget; AP points, "
        text += "dAP = AP50 lost to that error type; sapd.report.comparison.paired_table):\n" + pairs
    note = unpaired_note(rows, same_commit)
    if note:
        text += "\n\n" + note
    if decide and pairs:
        text += "\n\nPaired rule (sapd.report.decision_rule.paired_decisions): B beats A when the 95 % CI of the "
        text += f"paired AP differences lies above 0, by more than {EFFECT:.1f} AP when its lower end is above "
        text += f"+{EFFECT:.1f}; A is better when it lies below 0; otherwise open:\n"
        text += paired_decisions(rows, same_commit=same_commit) or "- no comparison with 2 or more paired seeds"
    if decide:
        text += "\n\nDecision rule (sapd.report.decision_rule.decisions):\n"
        text += decisions(rows, reference=reference, same_commit=same_commit) or "- no variant with a +SW+SS row"
        text += f"\n\nGoal (sapd.report.decision_rule.goals): +SW >= FSAF and +SW+SS >= FSAF + {SS_MARGIN:.1f} AP,"
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
    """Prints the table (stdout), or with ``compare`` the image bootstrap of two detection sets; a missing
    folder or file, no runs, or a bad ``dirs`` or ``compare`` is one line on stderr, exit code 2."""
    configure_logging()
    if cfg.get("compare") is not None:
        if not OmegaConf.is_missing(cfg, "dirs") and cfg.dirs is not None:
            raise ConfigError("give dirs= (a table of seeded runs) or compare= (two detection sets), not both")
        check_config(cfg)
        a, b = cfg.compare  # two texts: checked against SETTINGS["compare"]
        print(image_bootstrap(a, b, cfg.get("annotations")))
        return
    if cfg.get("annotations") is not None:
        raise ConfigError("annotations= goes with compare='[A,B]' (two detection sets); give both, or neither")
    if OmegaConf.is_missing(cfg, "dirs") or cfg.dirs is None:
        raise FileNotFoundError("give the folders to tabulate: python -m sapd.report dirs=results/table2_screen")
    check_config(cfg)
    text = report(
        folders(cfg.dirs),
        decide=bool(cfg.decide),
        reference=str(cfg.reference),
        same_commit=bool(cfg.get("same_commit", False)),
    )
    print(text)
