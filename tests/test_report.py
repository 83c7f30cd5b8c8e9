"""sapd.report: seeded runs grouped into rows, mean ± std, per-seed values, and the decision rule."""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import sapd
from sapd.paths import initialize_configs
from sapd.report.command import folders, main, report
from sapd.report.comparison import pooled_std
from sapd.report.decision_rule import decisions, goals, paired_decisions
from sapd.report.summaries import find_summaries, run_value
from sapd.report.table import group_runs, markdown_table

SWITCHES = {"soft_weight_norm": "none", "valid_region": "cell_overlap", "eta": 1.0, "topk": 3}
ABLATIONS = {"FSAF": (False, False), "+SW": (True, False), "+SW+SS": (True, True)}


def write_run(folder, n, ablation, seed, ap, minutes=9.0, **switches):
    if ablation == "FCOS":  # model=fcos: its summary has no SAPD switches
        model = {"_target_": "sapd.models.FCOSDetector"}
    else:
        sw, ss = ABLATIONS[ablation]
        model = {"_target_": "sapd.models.SAPD", "soft_weight": sw, "soft_select": ss, **SWITCHES, **switches}
    run = folder / str(n)
    run.mkdir(parents=True)
    summary = {
        "seed": seed,
        "model": model,
        "max_epochs": 8,
        "limit_train_batches": None,
        "metrics": {"map": ap / 100, "map_50": (ap + 20) / 100, "map_large": -1.0},
        "minutes": minutes,
        "seconds_per_step": 0.25,
    }
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    n = 0
    table = {
        ("FSAF", "none"): [43, 44, 45],
        ("+SW+SS", "none"): [40, 42, 44],
        ("FSAF", "level_max"): [43, 44, 45],  # the switch does not touch FSAF: same row as above
        ("+SW+SS", "level_max"): [44, 45, 46],
    }
    for (ablation, norm), aps in table.items():
        for seed, ap in enumerate(aps):
            write_run(tmp_path / "multirun", n, ablation, seed, ap, soft_weight_norm=norm)
            n += 1
    return tmp_path


def test_rows_mean_std_and_per_seed(sweep):
    rows = group_runs(find_summaries([sweep]))
    names = [(r.name, r.variant) for r in rows]
    assert names == [("FSAF", "paper"), ("+SW+SS", "paper"), ("+SW+SS", "soft_weight_norm=level_max")]
    fsaf, paper, variant = rows
    assert len(fsaf.runs) == 6  # level_max is not a FSAF variant: both FSAF sweeps form one row
    assert paper.mean_std("map") == pytest.approx((42.0, 2.0))
    assert variant.mean_std("map") == pytest.approx((45.0, 1.0))
    assert math.isnan(paper.mean_std("map_large")[0])  # COCO's -1 (no large objects) is no value
    table = markdown_table(rows)
    assert "| +SW+SS | paper | 8 ep | 3 | 42.0 ± 2.0 | 62.0 ± 2.0 |" in table
    assert "40.0 (s0), 42.0 (s1), 44.0 (s2)" in table and "| 9.0 | 0.250 |" in table


def test_decision_rule(sweep):
    rows = group_runs(find_summaries([sweep]))
    # pooled std of [40, 42, 44] and [44, 45, 46]: sqrt((8 + 2) / 4) = 1.58; gain 3.0; FSAF mean 44.
    assert pooled_std(rows[1], rows[2]) == pytest.approx(math.sqrt(2.5))
    text = decisions(rows)
    assert "gain +3.0 > pooled std 1.6" in text and "not below its FSAF row (44.0)" in text
    assert text.endswith("becomes the default")


def test_decision_rule_rejects_a_variant_below_fsaf(tmp_path):
    for seed, (p, v, f) in enumerate([(40, 44, 47), (42, 45, 48), (44, 46, 49)]):
        write_run(tmp_path, 3 * seed, "+SW+SS", seed, p)
        write_run(tmp_path, 3 * seed + 1, "+SW+SS", seed, v, valid_region="centre")
        write_run(tmp_path, 3 * seed + 2, "FSAF", seed, f, valid_region="centre")
    text = decisions(group_runs(find_summaries([tmp_path])))
    assert "below its FSAF row (48.0)" in text and text.endswith("not adopted")


def test_decision_rule_against_a_later_default(tmp_path):
    """reference= names the setting to beat: eta=2 on level_max against level_max (not against the
    paper's row, which it would beat), and the reference row gets no line of its own."""
    for seed, (p, lm, e2, f) in enumerate([(40, 47, 48, 45), (42, 48, 50, 46), (44, 49, 52, 47)]):
        write_run(tmp_path, 4 * seed, "+SW+SS", seed, p)
        write_run(tmp_path, 4 * seed + 1, "+SW+SS", seed, lm, soft_weight_norm="level_max")
        write_run(tmp_path, 4 * seed + 2, "+SW+SS", seed, e2, soft_weight_norm="level_max", eta=2.0)
        write_run(tmp_path, 4 * seed + 3, "FSAF", seed, f)
    rows = group_runs(find_summaries([tmp_path]))
    text = decisions(rows, reference="soft_weight_norm=level_max")
    # eta=2: mean 50 vs 48; pooled std sqrt((8 + 2) / 4) = 1.58; FSAF (eta does not matter to it) 46
    assert text.splitlines() == [
        "- paper (8 ep): +SW+SS 42.0 vs soft_weight_norm=level_max 48.0, gain -6.0 <= pooled std 1.6;"
        " below its FSAF row (46.0) -> not adopted",
        "- eta=2.0, soft_weight_norm=level_max (8 ep): +SW+SS 50.0 vs soft_weight_norm=level_max 48.0,"
        " gain +2.0 > pooled std 1.6; not below its FSAF row (46.0) -> becomes the default",
    ]
    assert "vs paper" in decisions(rows)  # the default reference is still the paper's setting
    text = report([tmp_path], decide=True, reference="eta=2.0, soft_weight_norm=level_max")
    assert "- soft_weight_norm=level_max (8 ep): +SW+SS 48.0 vs eta=2.0, soft_weight_norm=level_max 50.0" in text
    lines = decisions(rows, reference="nothing").splitlines()
    assert len(lines) == 3
    assert all(line.endswith(": no nothing +SW+SS row at this budget to compare with") for line in lines)


def test_decision_rule_waits_for_three_seeds_per_row(tmp_path):
    """A gain far beyond the spread is still undecided while a row has fewer than 3 seeds."""
    for seed, (p, v) in enumerate([(40, 50), (41, 51)]):
        write_run(tmp_path, 2 * seed, "+SW+SS", seed, p)
        write_run(tmp_path, 2 * seed + 1, "+SW+SS", seed, v, soft_weight_norm="level_max")
    write_run(tmp_path, 9, "FSAF", 0, 45)
    text = decisions(group_runs(find_summaries([tmp_path])))
    assert "gain +10.0 > pooled std" in text
    assert "undecided: the rule needs >= 3 seeds per row" in text and "FSAF paper n=1" in text
    assert "becomes the default" not in text


def goal_runs(folder, fcos, sw=(46, 47, 48)):
    """FSAF 45 ± 1, +SW ``sw`` (default 47 ± 1: gap 2 > pooled std 1), +SW+SS 46 ± 0.5 (gap 1.0,
    pooled std 0.79) and FCOS ``fcos``, one run per seed."""
    table = {"FSAF": [44, 45, 46], "+SW": sw, "+SW+SS": [45.5, 46, 46.5], "FCOS": fcos}
    n = 0
    for ablation, aps in table.items():
        for seed, ap in enumerate(aps):
            write_run(folder, n, ablation, seed, ap)
            n += 1
    return group_runs(find_summaries([folder]))


def test_a_peer_detector_is_its_own_last_row(tmp_path):
    rows = goal_runs(tmp_path, fcos=[44, 45, 46])
    names = [(r.name, r.variant) for r in rows]
    assert names == [("FSAF", "paper"), ("+SW", "paper"), ("+SW+SS", "paper"), ("FCOS", "-")]
    assert "| FCOS | - | 8 ep | 3 | 45.0 ± 1.0 |" in markdown_table(rows)
    assert "FCOS" not in decisions(rows)  # the rule compares SAPD settings only


def test_goal_met_when_every_gap_clears_its_bar(tmp_path):
    text = goals(goal_runs(tmp_path, fcos=[44, 45, 46]))
    assert "+SW - FSAF +2.0 (pooled std 1.0): met" in text
    assert "+SW+SS - FSAF +1.0 (needs >= +1.0 and > pooled std 0.8): met" in text
    assert "+SW+SS - FCOS +1.0 (pooled std 0.8): met" in text and "n < 3" not in text
    assert text.endswith("-> goal met")


def test_goal_not_met_below_the_peer_or_inside_the_noise(tmp_path):
    text = goals(goal_runs(tmp_path / "a", fcos=[47, 48, 49]))
    assert "+SW+SS - FCOS -2.0 (pooled std 0.8): not met" in text and text.endswith("-> goal not met")
    # +SW 2 AP above FSAF is no gain when its seeds spread by 3: pooled std sqrt((2 + 18) / 4) = 2.2
    text = goals(goal_runs(tmp_path / "b", fcos=[44, 45, 46], sw=[44, 47, 50]))
    assert "+SW - FSAF +2.0 (pooled std 2.2): not met" in text and text.endswith("-> goal not met")


def test_goal_waits_for_three_seeds_of_every_row(tmp_path):
    text = goals(goal_runs(tmp_path / "a", fcos=[44, 46]))
    assert "+SW+SS - FCOS +1.0 (pooled std 0.9): met so far, n < 3" in text
    assert text.endswith("-> undecided: needs FCOS - n=2 (>= 3 seeds per row)")
    # without a peer every SAPD comparison can be met and the goal still waits for one
    text = goals(goal_runs(tmp_path / "b", fcos=[]))
    assert "no peer detector at this budget" in text and text.endswith("-> undecided: needs a peer row")


def test_goal_of_a_screening_without_fsaf_rows_is_one_line(tmp_path):
    """+SW+SS variants alone (the screening): one undecided line, not one per variant; a setting that
    has its rows keeps its own line."""
    for seed in range(3):
        write_run(tmp_path / "a", 2 * seed, "+SW+SS", seed, 45 + seed)
        write_run(tmp_path / "a", 2 * seed + 1, "+SW+SS", seed, 47 + seed, soft_weight_norm="level_max")
    text = goals(group_runs(find_summaries([tmp_path / "a"])))
    assert text == "- no +SW+SS setting has its FSAF and +SW rows at its budget (2 settings) -> undecided"
    goal_runs(tmp_path / "b", fcos=[44, 45, 46])
    for seed in range(3):
        write_run(tmp_path / "b", 20 + seed, "+SW+SS", seed, 47 + seed, soft_weight_norm="level_max")
    text = goals(group_runs(find_summaries([tmp_path / "b"])))
    assert text.splitlines()[0].endswith("-> goal met")
    # its FSAF row is the paper one (FSAF has no soft weights to normalise): only +SW is missing
    assert text.splitlines()[1] == "- soft_weight_norm=level_max (8 ep): no +SW row of this setting -> undecided"


def test_goal_not_met_by_one_decided_failure_while_another_row_is_short(tmp_path):
    """+SW+SS 2 AP below FSAF with 3 seeds each fails the goal, whatever a 2-seed +SW row shows."""
    for seed, (fsaf, sw, ss) in enumerate([(44, 46, 42), (45, 47, 43), (46, 0, 44)]):
        write_run(tmp_path, 3 * seed, "FSAF", seed, fsaf)
        write_run(tmp_path, 3 * seed + 1, "+SW+SS", seed, ss)
        if sw:
            write_run(tmp_path, 3 * seed + 2, "+SW", seed, sw)
    text = goals(group_runs(find_summaries([tmp_path])))
    assert "+SW - FSAF +1.5" in text and "n < 3" in text
    assert "+SW+SS - FSAF -2.0 (needs >= +1.0 and > pooled std 1.0): not met;" in text
    assert text.endswith("-> goal not met")


def report_config(*overrides: str):
    """conf/report.yaml with ``overrides``, as ``python -m sapd.report`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("report", overrides=list(overrides))


def test_dirs_may_be_one_folder_or_a_list():
    assert folders("results/a") == ["results/a"]
    assert folders(OmegaConf.create({"d": ["a", "b"]}).d) == ["a", "b"]
    for bad in ([], 3, [["a"]]):
        with pytest.raises(ValueError, match="dirs must be a folder or a list of folders"):
            folders(bad)


def test_cli_prints_the_table_and_refuses_empty_folders(sweep, tmp_path, capsys, caplog):
    main(report_config(f"dirs={sweep}", "decide=true"))
    out = capsys.readouterr().out
    assert out.startswith("| row | variant |") and "Decision rule" in out
    main(report_config(f"dirs=[{sweep},{sweep}]"))
    twice = capsys.readouterr().out
    assert "Decision rule" not in twice and "| +SW+SS | paper | 8 ep | 6 |" in twice  # both folders read
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        report([tmp_path / "empty"])
    for overrides, message in (
        ([f"dirs={tmp_path / 'missing'}"], "does not exist"),
        ([], "give the folders to tabulate"),
        ([f"dirs={tmp_path / 'empty'}"], "no summary.json"),
    ):
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:  # one line for the user, no traceback
            main(report_config(*overrides))
        assert exit_info.value.code == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert capsys.readouterr().out == ""


def _run_report(args: list[str], cwd) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "sapd.report", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_command_line_writes_nothing_but_the_table(sweep, tmp_path):
    """The real command: table on stdout, no Hydra run folder, .hydra/ or log file in the working folder."""
    cwd = tmp_path / "cwd"
    done = _run_report([f"dirs={sweep / 'multirun'}", "decide=true"], cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| row | variant |") and "becomes the default" in done.stdout
    assert list(cwd.iterdir()) == []
    failed = _run_report([f"dirs=[{tmp_path / 'missing'}]"], cwd)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [
        f"sapd.report: {tmp_path / 'missing'} does not exist: give a run, multirun or results folder"
    ]
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("name", ["report", "analysis", "synthetic"])
def test_tools_make_no_run_folder_and_no_log_file(name):
    """report, analysis and synthetic run in place: no outputs/ or .hydra/ folder, no log file, messages on stderr."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        hydra_cfg = compose(name, return_hydra_config=True).hydra
    assert hydra_cfg.output_subdir is None and hydra_cfg.run.dir == "."
    handlers = hydra_cfg.job_logging.handlers
    assert list(handlers) == ["console"] and handlers.console.stream == "ext://sys.stderr"


# ------------------------------------------------------------------------------------ paired seeds
COMMIT = {"sha": "0123456789abcdef" * 2 + "01234567", "dirty": False}
SYNTHETIC = {"name": "synthetic", "synthetic": {"seed": 0, "num_train": 2000}}


def write_recorded(folder, n, ablation, seed, ap, commit=COMMIT, data=SYNTHETIC, errors=None, extra=(), **switches):
    """A run whose summary records its commit and data (``errors``: its report/errors.csv, dAP by type
    on all objects, or by ``type@size`` on one size; ``extra``: more summary keys)."""
    write_run(folder, n, ablation, seed, ap, **switches)
    path = folder / str(n) / "summary.json"
    run = json.loads(path.read_text())
    run.update({"commit": commit, "data": data, **dict(extra)})
    path.write_text(json.dumps(run))
    if errors is not None:
        (folder / str(n) / "report").mkdir()
        lines = ["size,error,description,dAP,count,AP50"]
        sized = ((*(key.split("@") if "@" in key else (key, "all")), v) for key, v in errors.items())
        lines += [f"{size},{e},x,{v / 100:.6f},1,0.5" for e, size, v in sized]
        (folder / str(n) / "report" / "errors.csv").write_text("\n".join(lines) + "\n")


def test_t_quantiles_and_seeds_needed_match_the_tables():
    from sapd.report.seed_statistics import seeds_needed, t_cdf, t_quantile

    # Student's t table (two-sided 5 %: 12.706, 4.303, 2.776, 2.228; one-sided 20 % at 7 dof: 0.896)
    for dof, p, value in (
        (1, 0.975, 12.706),
        (2, 0.975, 4.303),
        (4, 0.975, 2.776),
        (10, 0.975, 2.228),
        (7, 0.8, 0.896),
    ):
        assert t_quantile(p, dof) == pytest.approx(value, abs=1e-3)
        assert t_cdf(value, dof) == pytest.approx(p, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    # paired seeds for 1 AP at 80 % power: the noncentral-t answers (n = 5, 9, 20 at sd 0.5, 0.9, 1.5)
    assert [seeds_needed(sd) for sd in (0.5, 0.9, 1.5)] == [5, 9, 20]
    assert seeds_needed(math.nan) is None


def test_paired_differences_of_rows_on_one_commit(tmp_path):
    fsaf, soft = [48.8, 49.7, 48.3], [49.5, 51.4, 48.2]
    for seed in range(3):
        write_recorded(tmp_path, 2 * seed, "FSAF", seed, fsaf[seed], errors={"Cls": 6.0 + seed, "Loc": 4.0})
        write_recorded(tmp_path, 2 * seed + 1, "+SW+SS", seed, soft[seed], errors={"Cls": 6.5 + seed, "Loc": 3.0})
    text = report([tmp_path])
    assert "| row | variant | budget | data | commit | n |" in text
    assert "| FSAF | paper | 8 ep | synthetic (seed 0) | 0123456789ab | 3 |" in text
    diffs = [0.7, 1.7, -0.1]
    mean, sd = sum(diffs) / 3, statistics.stdev(diffs)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2)
    line = next(x for x in text.splitlines() if x.startswith("| +SW+SS - FSAF") and "| AP |" in x)
    assert "| 3 | +0.7 (s0), +1.7 (s1), -0.1 (s2) |" in line
    assert f"| {mean:+.1f} ± {sd:.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] | 9 |" in line
    # the TIDE error types from the runs' errors.csv: +0.5 classification, -1.0 localisation each seed
    assert "| dAP Cls | 3 | +0.5 (s0), +0.5 (s1), +0.5 (s2) | +0.5 ± 0.0 | [+0.5, +0.5] | 2 | more errors |" in text
    assert "| dAP Loc | 3 | -1.0 (s0), -1.0 (s1), -1.0 (s2) |" in text and "| fewer errors |" in text
    assert line.endswith("| 9 | open |")  # the AP interval spans 0
    rule = report([tmp_path], decide=True).split("Paired rule")[1].splitlines()[1]
    assert rule.startswith(f"- +SW+SS - FSAF (paper, 8 ep, synthetic (seed 0), 0123456789ab): AP {mean:+.1f} over 3 ")
    assert rule.endswith("-> open: a 1.0-AP effect needs 9 paired seeds at this spread")


def test_paired_rule_reads_the_interval_of_each_comparison(tmp_path):
    """+SW beats FSAF by more than 1 AP (lower end above +1), +SW+SS beats FSAF by less, so +SW is better
    than +SW+SS; with 2 shared seeds the rule waits; the table reads each interval the same way."""
    fsaf, sw, soft = [45.0, 47.0, 46.0], [46.5, 48.6, 47.7], [45.5, 47.6, 46.5]
    for seed in range(3):
        for n, (ablation, ap) in enumerate((("FSAF", fsaf), ("+SW", sw), ("+SW+SS", soft))):
            write_recorded(tmp_path, 3 * seed + n, ablation, seed, ap[seed])
    rows = group_runs(find_summaries([tmp_path]))
    lines = paired_decisions(rows).splitlines()
    assert [x.split(" (")[0] for x in lines] == ["- +SW - FSAF", "- +SW+SS - FSAF", "- +SW+SS - +SW"]

    def ci(b, a):  # mean and 95 % t-interval of b - a: t(0.975, 2) = 4.303
        d = [y - x for x, y in zip(a, b)]
        mean, half = statistics.fmean(d), 4.303 * statistics.stdev(d) / math.sqrt(3)
        return f"AP {mean:+.1f} over 3 paired seeds, 95 % CI [{mean - half:+.1f}, {mean + half:+.1f}]"

    assert lines[0].endswith(f"{ci(sw, fsaf)} -> +SW beats FSAF by more than 1.0 AP")  # [+1.4, +1.8]
    low = statistics.fmean([0.5, 0.6, 0.5]) - 4.303 * statistics.stdev([0.5, 0.6, 0.5]) / math.sqrt(3)
    assert lines[1].endswith(f"{ci(soft, fsaf)} -> +SW+SS beats FSAF, not by more than 1.0 AP (lower end {low:+.1f})")
    assert lines[2].endswith(f"{ci(soft, sw)} -> +SW is better")  # [-1.4, -0.8]
    readings = [x.split(" | ")[-1] for x in comparison_lines(report([tmp_path]))]
    assert readings == ["higher by > 1 |", "higher |", "lower |"]
    waits = paired_decisions(rows, min_seeds=4).splitlines()[0]
    assert waits.endswith("-> undecided: the rule needs >= 4 paired seeds")


def comparison_lines(text):
    """The paired table's lines of ``text`` (B - A first)."""
    return [x for x in text.splitlines() if " - " in x.split(" | ")[0] and x.startswith("| +SW")]


def sized_ablation_runs(folder, with_errors=("FSAF", "+SW", "+SW+SS")):
    """FSAF, +SW and +SW+SS on 3 shared seeds of one commit; the runs of ``with_errors`` have an
    errors.csv with all-size and medium/large localisation and missed dAPs (AP50 points)."""
    table = {
        "FSAF": ([45.0, 46.0, 47.0], [3.0, 3.0, 3.0], [4.0, 4.0, 4.0], [5.0, 5.0, 5.0], [6.0, 6.0, 6.0]),
        "+SW": ([46.0, 47.0, 48.0], [2.0, 2.0, 2.0], [1.5, 1.5, 1.5], [4.0, 4.0, 4.0], [3.0, 2.5, 4.0]),
        "+SW+SS": ([47.0, 49.0, 48.0], [1.5, 1.0, 1.2], [1.0, 1.0, 1.0], [3.0, 3.5, 2.0], [2.0, 2.0, 2.5]),
    }
    n = 0
    for ablation, (aps, loc_m, loc_l, miss_m, miss_l) in table.items():
        for seed in range(3):
            errors = {"Loc": 7.0, "Miss": 8.0 + seed, "Loc@small": 9.0}
            errors.update({"Loc@medium": loc_m[seed], "Loc@large": loc_l[seed]})
            errors.update({"Miss@medium": miss_m[seed], "Miss@large": miss_l[seed]})
            write_recorded(folder, n, ablation, seed, aps[seed], errors=errors if ablation in with_errors else None)
            n += 1


def test_a_run_keeps_the_errors_of_every_object_size(tmp_path):
    sized_ablation_runs(tmp_path)
    run = next(r for r in find_summaries([tmp_path]) if r["path"].endswith("/4"))  # +SW, seed 1
    assert run_value(run, "dAP_Loc") == pytest.approx(7.0) and run_value(run, "dAP_Miss") == pytest.approx(9.0)
    assert run_value(run, "dAP_Loc@medium") == pytest.approx(2.0) and run_value(run, "dAP_Loc@small") == 9.0
    assert run_value(run, "dAP_Miss@large") == pytest.approx(2.5)
    assert math.isnan(run_value(run, "dAP_Cls@large"))  # not in its errors.csv


def test_paired_table_compares_sizes_and_soft_selection_against_soft_weighting(tmp_path):
    """Localisation and missed errors on medium and large objects, and +SW+SS - +SW (soft selection
    alone), each seed by seed, after the comparisons against FSAF."""
    sized_ablation_runs(tmp_path)
    lines = comparison_lines(report([tmp_path]))
    comparisons = [x.split(" | ")[0] for x in lines]
    # no AP75 in these summaries, and no all-size type but Loc and Miss in their errors.csv: no line
    metrics = ["AP", "dAP Loc", "dAP Miss"]
    metrics += ["dAP Loc, medium", "dAP Loc, large", "dAP Miss, medium", "dAP Miss, large"]
    assert comparisons == ["| +SW - FSAF"] * 7 + ["| +SW+SS - FSAF"] * 7 + ["| +SW+SS - +SW"] * 7
    assert [x.split(" | ")[5] for x in lines] == metrics * 3
    by_line = {(x.split(" | ")[0], x.split(" | ")[5]): x for x in lines}
    # +SW+SS - +SW: AP 47-46, 49-47, 48-48
    assert "| 3 | +1.0 (s0), +2.0 (s1), +0.0 (s2) | +1.0 ± 1.0 |" in by_line["| +SW+SS - +SW", "AP"]
    # missed errors on large objects: 2.0-3.0, 2.0-2.5, 2.5-4.0 = -1.0, -0.5, -1.5: mean -1.0, sd 0.5,
    # 95 % CI -1.0 ± 4.303 * 0.5 / sqrt(3) = [-2.2, +0.2], 5 seeds for 1 point at sd 0.5
    line = by_line["| +SW+SS - +SW", "dAP Miss, large"]
    assert "| 3 | -1.0 (s0), -0.5 (s1), -1.5 (s2) | -1.0 ± 0.5 | [-2.2, +0.2] | 5 |" in line
    # localisation on medium objects: 1.5-2.0, 1.0-2.0, 1.2-2.0
    diffs = [-0.5, -1.0, -0.8]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = 4.303 * sd / math.sqrt(3)
    line = by_line["| +SW+SS - +SW", "dAP Loc, medium"]
    assert f"| -0.5 (s0), -1.0 (s1), -0.8 (s2) | {mean:+.1f} ± {sd:.1f} |" in line
    assert f"| [{mean - half:+.1f}, {mean + half:+.1f}] |" in line
    assert "| -0.5 (s0), -0.5 (s1), -0.5 (s2) | -0.5 ± 0.0 |" in by_line["| +SW+SS - +SW", "dAP Loc, large"]
    assert "| -1.0 (s0), -0.5 (s1), -2.0 (s2) |" in by_line["| +SW+SS - +SW", "dAP Miss, medium"]
    # against FSAF too: missed on medium objects, +SW+SS 3.0, 3.5, 2.0 against FSAF's 5.0
    assert "| -2.0 (s0), -1.5 (s1), -3.0 (s2) |" in by_line["| +SW+SS - FSAF", "dAP Miss, medium"]
    assert "| -2.5 (s0), -2.5 (s1), -2.5 (s2) | -2.5 ± 0.0 |" in by_line["| +SW - FSAF", "dAP Loc, large"]


def test_paired_table_without_errors_csv_has_no_error_lines(tmp_path):
    """FSAF runs without report/errors.csv: their comparisons keep AP and have no dAP line;
    +SW+SS - +SW, whose runs have one, keeps all of them."""
    sized_ablation_runs(tmp_path, with_errors=("+SW", "+SW+SS"))
    lines = comparison_lines(report([tmp_path], decide=True))
    against_fsaf = [x.split(" | ")[5] for x in lines if " - FSAF" in x.split(" | ")[0]]
    assert against_fsaf == ["AP", "AP"]
    assert "| dAP Miss, large | 3 | -1.0 (s0), -0.5 (s1), -1.5 (s2) |" in lines[-1]
    assert len([x for x in lines if x.startswith("| +SW+SS - +SW")]) == 7


def test_each_row_has_its_tide_breakdown(tmp_path):
    """Mean ± std of each error type over the runs with an errors.csv; a row without one is left out."""
    sized_ablation_runs(tmp_path, with_errors=("+SW", "+SW+SS"))
    text = report([tmp_path]).split("TIDE errors of each row")[1].split("\n\n")[0]
    head, _, *lines = text.splitlines()[1:]
    types = "| Cls | Loc | Both | Dupe | Bkg | Miss | Loc, medium | Loc, large | Miss, medium | Miss, large |"
    assert head.endswith(f"| n {types}")
    assert [x.split(" | ")[0] for x in lines] == ["| +SW", "| +SW+SS"]  # FSAF's runs have no errors.csv
    # +SW: Loc 7 on every seed, Miss 8, 9, 10, Loc on medium objects 2, Miss on large ones 3.0, 2.5, 4.0
    sw = "| 3 | - | 7.0 ± 0.0 | - | - | - | 9.0 ± 1.0 | 2.0 ± 0.0 | 1.5 ± 0.0 | 4.0 ± 0.0 | 3.2 ± 0.8 |"
    assert lines[0].endswith(sw)
    for f in tmp_path.rglob("errors.csv"):
        f.unlink()
    assert "TIDE errors" not in report([tmp_path])


def test_runs_of_other_commits_data_or_budgets_are_never_pooled_or_paired(tmp_path):
    other = {"sha": "f" * 40, "dirty": False}
    coco = {"name": "coco", "root": "data/coco"}
    for seed in range(3):
        write_recorded(tmp_path, 10 + seed, "+SW+SS", seed, 45 + seed, commit=other)
        write_recorded(tmp_path, 20 + seed, "FSAF", seed, 44 + seed)
        write_recorded(tmp_path, 30 + seed, "FSAF", seed, 30 + seed, data=coco, commit=other)
        write_recorded(tmp_path, 40 + seed, "FSAF", seed, 40 + seed, commit=other, extra={"max_epochs": 4})
    rows = group_runs(find_summaries([tmp_path]))
    assert len(rows) == 4 and all(len(r.runs) == 3 for r in rows)  # four rows, none pooled
    assert {(r.name, r.data, r.commit, r.budget) for r in rows} == {
        ("+SW+SS", "synthetic (seed 0)", "ffffffffffff", "8 ep"),
        ("FSAF", "synthetic (seed 0)", "0123456789ab", "8 ep"),
        ("FSAF", "coco", "ffffffffffff", "8 ep"),
        ("FSAF", "synthetic (seed 0)", "ffffffffffff", "4 ep"),
    }
    assert "Paired differences" not in report([tmp_path])  # no FSAF row shares the +SW+SS row's commit
    text = goals(rows)
    assert text.startswith("- no +SW+SS setting has its FSAF and +SW rows")
    # a reference row from another commit is not compared with
    for seed in range(3):
        write_recorded(tmp_path, 50 + seed, "+SW+SS", seed, 47, soft_weight_norm="level_max")
    rule = decisions(group_runs(find_summaries([tmp_path])))
    assert "no paper +SW+SS row at this budget, data and commit to compare with (one exists from another" in rule


def test_summaries_without_a_commit_pair_only_when_told(sweep):
    """The existing results record no commit: tabled unpaired as before, paired with same_commit=true."""
    text = report([sweep], decide=True)
    assert "Paired differences" not in text and "same_commit=true pairs them" in text
    assert "| row | variant | budget | n |" in text  # no data or commit column
    paired_text = report([sweep], decide=True, same_commit=True)
    # FSAF has 6 runs with seeds 0, 1, 2 twice: a repeated seed is not paired
    assert "Paired differences" not in paired_text
    rows = group_runs(find_summaries([sweep]))
    assert rows[0].by_seed("map") == {}


def test_decision_rule_on_paired_differences(tmp_path):
    """A 1-AP gain inside the rows' spread (pooled std 4) but the same on every seed: paired, it clears."""
    ref, variant = [40.0, 44.0, 48.0], [41.2, 44.9, 49.1]
    for seed in range(3):
        write_recorded(tmp_path, 3 * seed, "+SW+SS", seed, ref[seed])
        write_recorded(tmp_path, 3 * seed + 1, "+SW+SS", seed, variant[seed], soft_weight_norm="level_max")
        write_recorded(tmp_path, 3 * seed + 2, "FSAF", seed, ref[seed] - 0.5)
    rows = group_runs(find_summaries([tmp_path]))
    text = decisions(rows)
    assert "paired gain +1.1 (3 paired seeds, 95 % CI [+0.7, +1.4], above 0)" in text
    assert text.endswith("becomes the default")
    # the same runs without a recorded commit: unpaired, the gain is inside the pooled std
    for f in tmp_path.rglob("summary.json"):
        run = json.loads(f.read_text())
        run.pop("commit")
        f.write_text(json.dumps(run))
    unpaired = decisions(group_runs(find_summaries([tmp_path])))
    assert "gain +1.1 <= pooled std 4.0" in unpaired and unpaired.endswith("not adopted")


def test_the_run_summary_records_its_commit_and_data():
    from sapd.provenance import data_identity, source_commit

    repo = Path(__file__).resolve().parents[1]
    commit = source_commit()
    if (repo / ".git").exists() and Path(sapd.__file__).resolve().is_relative_to(repo / "src"):
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert commit is not None and commit["sha"] == head.stdout.strip() and isinstance(commit["dirty"], bool)
    else:  # an installed package: no checkout to name
        assert commit is None
    GlobalHydra.instance().clear()
    with initialize_configs():
        base = data_identity(compose("train"))
        other = data_identity(compose("train", overrides=["data.synthetic.seed=1", "data.batch_size=2"]))
    assert base["name"] == "synthetic" and base["synthetic"]["seed"] == 0 and "batch_size" not in base
    assert other["synthetic"]["seed"] == 1 and {k: v for k, v in other.items() if k != "synthetic"} == {
        k: v for k, v in base.items() if k != "synthetic"
    }


def drawn_detections(folder: Path, images: int = 30) -> tuple[Path, Path, Path]:
    """A COCO annotation file of ``images`` images (two objects each, every size) and two result sets
    drawn on it: A's boxes shifted off their objects at random, B's on them. Returns (gt, A, B)."""
    rng = random.Random(0)
    categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    gt: dict[str, list] = {"images": [], "annotations": [], "categories": categories}
    a, b = [], []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": 256, "height": 256, "file_name": f"{image_id}.png"})
        for category, side in ((3, rng.uniform(10, 28)), (7, rng.uniform(40, 150))):
            box = [rng.uniform(0, 100), rng.uniform(0, 100), side, side * rng.uniform(0.8, 1.2)]
            ann = {"image_id": image_id, "category_id": category, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, **ann})
            b.append({"image_id": image_id, "category_id": category, "bbox": box, "score": rng.uniform(0.5, 1)})
            shifted = [box[0] + rng.uniform(-0.5, 0.5) * box[2], box[1], box[2], box[3]]
            a.append({"image_id": image_id, "category_id": category, "bbox": shifted, "score": rng.uniform(0.5, 1)})
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "instances_val.json", folder / "a.json", folder / "b.json"
    for path, content in zip(paths, (gt, a, b)):
        path.write_text(json.dumps(content))
    return paths


def bootstrap_rows(text: str) -> dict[str, list[str]]:
    rows = [line[2:-2].split(" | ") for line in text.splitlines() if line.startswith("| AP")]
    return {cells[0]: cells[1:] for cells in rows}


def test_compare_prints_the_image_bootstrap_of_two_detection_sets(tmp_path, capsys):
    gt, a, b = drawn_detections(tmp_path)
    evaluation = tmp_path / "evaluate_b"  # B given as the run folder of python -m sapd.evaluate
    evaluation.mkdir()
    (evaluation / "results_val.json").write_text(b.read_text())
    main(report_config(f"compare=[{a},{evaluation}]", f"annotations={gt}"))
    out = capsys.readouterr().out
    assert out.startswith(f"Image bootstrap of B - A on the 30 images of {gt} (AP points; 1000 draws")
    assert f"B: {evaluation / 'results_val.json'}" in out and "not training noise across seeds" in out
    rows = bootstrap_rows(out)
    assert list(rows) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    gain = float(rows["AP"][0])
    lo, hi = (float(v) for v in rows["AP"][1].strip("[]").split(", "))
    assert 0 < lo < gain < hi  # B's boxes lie on the objects: better, beyond the image noise
    assert rows["APl"][0] != "-" and rows["APs"][0] != "-"
    # B against a copy of itself: no difference, an interval of width 0
    (tmp_path / "b_again.json").write_text(b.read_text())
    main(report_config(f"compare=[{b},{tmp_path / 'b_again.json'}]", f"annotations={gt}"))
    assert bootstrap_rows(capsys.readouterr().out)["AP"] == ["+0.0", "[+0.0, +0.0]"]


def test_compare_refuses_bad_input_in_one_line(tmp_path, capsys, caplog):
    gt, a, b = drawn_detections(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"  # detections of another data set: images the annotations lack
    elsewhere.write_text(json.dumps([{"image_id": 999, "category_id": 3, "bbox": [0, 0, 9, 9], "score": 0.9}]))
    (tmp_path / "no_results").mkdir()
    (tmp_path / "odd.json").write_text(json.dumps({"not": "detections"}))
    for overrides, message in (
        ([f"compare=[{a}]", f"annotations={gt}"], "compare must be a list of two results files"),
        ([f"compare=[{a},{b}]"], "compare needs annotations=FILE"),
        ([f"compare=[{a},{b}]", f"annotations={a}"], "is not a COCO annotation file"),
        ([f"compare=[{a},{tmp_path / 'missing.json'}]", f"annotations={gt}"], "missing.json does not exist"),
        ([f"compare=[{a},{tmp_path / 'no_results'}]", f"annotations={gt}"], "holds no results_val.json"),
        ([f"compare=[{a},{elsewhere}]", f"annotations={gt}"], "images that the annotations do not have (image_id 999"),
        ([f"compare=[{a},{tmp_path / 'odd.json'}]", f"annotations={gt}"], "is not a COCO results json"),
        ([f"compare=[{a},{a}]", f"annotations={gt}"], "twice"),
        ([f"compare=[{a},{b}]", f"annotations={gt}", f"dirs={tmp_path}"], "not both"),
        ([f"dirs={tmp_path}", f"annotations={gt}"], "annotations= goes with compare="),
    ):
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            main(report_config(*overrides))
        assert exit_info.value.code == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (overrides, errors)
    assert capsys.readouterr().out == ""
