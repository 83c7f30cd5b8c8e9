"""The rehearsal of the COCO job (benchmarks/rehearse.py) and what it found: the drawn set with COCO's
quirks, a resumable checkpoint of the COCO recipe, and (slow) the short rehearsal itself."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config

REPO = Path(__file__).resolve().parents[1]


def test_a_checkpoint_of_the_sgd_recipe_loads_as_lightning_resumes_it(tmp_path):
    """Lightning resumes (ckpt_path=...) with torch.load(weights_only=True): the hyperparameters a
    checkpoint holds must be plain Python (an omegaconf ListConfig of optim=sgd's milestones does not load)."""
    from sapd.build import build_module

    cfg = compose_config("train", [*TINY, "optim=sgd", "optim.scheduler.milestones=[1,2]"], tmp_path)
    module = build_module(cfg, label_to_cat_id=[1, 3])
    assert module.hparams["scheduler"]["milestones"] == [1, 2]
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["hyper_parameters"]["scheduler"]["milestones"] == [1, 2]


def test_the_coco_like_set_has_cocos_quirks(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from sapd.data.coco import COCODetection
    from sapd.data.coco_like import make_coco_like, quirks

    root = make_coco_like(tmp_path / "set", num_train=24, num_val=4)
    q = quirks(root, "train")
    assert q["images"] == 24 and q["categories"] == 80
    assert q["no_annotations"] >= 1 and q["all_crowd"] == 1 and q["only_zero_size"] == 1
    assert q["crowd_rle"] >= 1 and q["zero_size_boxes"] >= 2 and q["grayscale"] >= 1 and q["exif_rotated"] >= 1
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids[0] == 1 and ids[-1] == 90 and len(ids) == 80 and 12 not in ids  # COCO's gaps
    assert {c["name"] for c in data["categories"]} >= {"person", "toothbrush", "donut"}
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    assert mask_utils.area(crowd["segmentation"]) > 0  # compressed RLE that pycocotools decodes
    COCO(str(ann_file))  # pycocotools reads it
    # sapd reads it: the empty, all-crowd and zero-size-only images have no training box
    ds = COCODetection(ann_file, root / "train2017")
    assert ds.stats["empty_images"] == 3 and ds.stats["zero_size_boxes"] == q["zero_size_boxes"]
    assert ds.stats["no_annotations"] == q["no_annotations"] and ds.stats["images"] == 24
    assert make_coco_like(tmp_path / "set", num_train=24, num_val=4) == root  # reused, not drawn again


@pytest.mark.slow  # two 2-process runs of experiment=r50 shrunk: ~1.5 min on 2 cores
def test_short_rehearsal_of_the_coco_job(tmp_path):
    """2 gloo processes, one image each per step, killed mid-epoch in phase 2 and resumed: the checks of
    benchmarks/rehearse.py pass, and its figures are there."""
    from test_ddp import run_with_timeout

    out = tmp_path / "rehearse"
    cmd = [sys.executable, "-m", "benchmarks", "suite=rehearse", "form=short", f"out={out}"]
    code, log = run_with_timeout(cmd, cwd=REPO, env=None, timeout=600)
    assert code == 0, log[-4000:]
    report = json.loads((out / "rehearsal.json").read_text())
    assert report["failures"] == []
    assert report["exit_codes"] == {"killed": -9, "resumed": 0}
    assert report["kill"]["checkpoint_step"] < report["kill"]["at_step"] < report["total_steps"]
    lone = [e for e in report["empty_batch_steps"] if e["other_boxes"] and min(e["other_boxes"]) > 0]
    assert lone  # one process had no training box while the other had some, and neither hung
    assert [e["global_step"] for e in report["ends"]] == [report["total_steps"]] * 2
    assert report["results"]["detections"] > 0
    counts = report["data_counts"]["train"]
    assert counts["no_annotations"] >= 1 and counts["zero_size_boxes"] >= 1 and counts["crowd"] >= 1
    for ranks in report["processes"].values():
        assert all(p["s_per_step"] > 0 and p["peak_rss_mib"] > 0 for p in ranks)
    assert "s/step" in log and "peak RSS" in log and "all checks passed" in log


def test_rehearsal_finds_the_steps_where_one_process_had_no_training_box(capsys):
    from benchmarks import __main__ as entry
    from benchmarks.rehearse import empty_steps, step_figures

    def row(step, boxes, phase=1, seconds=0.5):
        return {"step": step, "boxes": boxes, "phase": phase, "seconds": seconds, "peak_rss_mib": 1.0,
                "workers_pss_mib": 0.0, "cpu_s": float(step)}  # fmt: skip

    killed = [[row(0, 2), row(1, 0), row(2, 0)], [row(0, 0), row(1, 3), row(2, 0)]]
    resumed = [[row(2, 0, 2)], [row(2, 4, 2)]]
    found = empty_steps([killed, resumed])
    assert [(e["run"], e["step"], e["rank"], e["other_boxes"]) for e in found] == [
        (0, 1, 0, [3]), (0, 2, 0, [0]), (0, 0, 1, [2]), (0, 2, 1, [0]), (1, 2, 0, [4]),
    ]  # fmt: skip
    figures = step_figures([row(0, 1, seconds=None), row(1, 1, 1, 0.2), row(2, 1, 2, 0.6), row(3, 1, 2, 0.8)])
    assert figures["steps"] == 4 and figures["s_per_step_phase1"] == 0.2 and figures["s_per_step_phase2"] == 0.7
    assert figures["cpu_s_at_last_step"] == 3.0
    with pytest.raises(SystemExit) as exc:
        entry.main(["suite=rehearse", "help"])
    assert exc.value.code == 0 and "form=full" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        entry.main(["suite=rehearse", "form=medium"])
    assert exc.value.code == 2
