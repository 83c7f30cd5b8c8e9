"""sapd.report: seeded runs grouped into rows, mean ± std, per-seed values, and the decision rule."""

from __future__ import annotations

import json
import math

import pytest

from sapd.report import decisions, find_summaries, group_runs, main, markdown_table, pooled_std, report

SWITCHES = {"soft_weight_norm": "none", "valid_region": "cell_overlap", "eta": 1.0, "topk": 3}
ABLATIONS = {"FSAF": (False, False), "+SW": (True, False), "+SW+SS": (True, True)}


def write_run(folder, n, ablation, seed, ap, minutes=9.0, **switches):
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


def test_cli_prints_the_table_and_refuses_empty_folders(sweep, tmp_path, capsys):
    main([str(sweep), "--decide"])
    out = capsys.readouterr().out
    assert out.startswith("| row | variant |") and "Decision rule" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        report([tmp_path / "empty"])
    with pytest.raises(SystemExit) as exit_info:  # one line for the user, no traceback
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
