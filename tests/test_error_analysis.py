"""The report's error analysis: TIDE errors, confusion matrix and calibration on hand-built cases."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sapd.diagnostics import error_analysis as ea
from sapd.diagnostics import report_folder
from sapd.module import SAPDLitModule

# Two classes: "a" (id 1) and "b" (id 2). Objects A (a, medium), B (a, large), C (b, medium),
# D (b, medium), on one image, far apart.
A, B, C, D = [10, 10, 40, 40], [100, 10, 100, 100], [10, 150, 40, 40], [250, 150, 80, 80]
GT = {
    "images": [{"id": 1, "width": 400, "height": 300}],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    "annotations": [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for i, (c, box) in enumerate(((1, A), (1, B), (2, C), (2, D)))
    ],
}
RESULTS = [
    {"image_id": 1, "category_id": 2, "bbox": D, "score": 0.95},  # true positive
    {"image_id": 1, "category_id": 1, "bbox": A, "score": 0.92},  # true positive
    {"image_id": 1, "category_id": 1, "bbox": [11, 11, 40, 40], "score": 0.85},  # duplicate of A
    {"image_id": 1, "category_id": 1, "bbox": [130, 30, 100, 100], "score": 0.75},  # B, IoU 5600/14400
    {"image_id": 1, "category_id": 1, "bbox": C, "score": 0.65},  # C with the wrong class
]


def test_tide_attributes_a_duplicate_a_mislocalised_box_and_a_wrong_class():
    analysis = ea.analyse(GT, RESULTS)
    counts = {(r["size"], r["error"]): r["count"] for r in analysis.errors}
    assert {e: counts[("all", e)] for e in ea.ERROR_TYPES} == {
        "Cls": 1,
        "Loc": 1,
        "Both": 0,
        "Dupe": 1,
        "Bkg": 0,
        "Miss": 0,
    }
    # B is the only large object: its mislocalised box counts there, not among the medium ones
    assert counts[("large", "Loc")] == 1 and counts[("medium", "Loc")] == 0
    assert counts[("medium", "Cls")] == 1 and counts[("large", "Cls")] == 0
    # AP50 by hand (101 recall points). Class a finds A first (recall 1/2 at precision 1): 51/101;
    # class b finds D only: 51/101. Fixing the class of C gives b recall 1 at precision 1.
    half = 51 / 101
    delta = analysis.delta_ap("all")
    base = next(r["AP50"] for r in analysis.errors if r["size"] == "all")
    assert base == pytest.approx(half)
    assert delta["Cls"] == pytest.approx((1 - half) / 2)
    # fixing B's box: class a reaches recall 1 at precision 2/3 (the duplicate stays a false positive)
    assert delta["Loc"] == pytest.approx(((51 + 50 * 2 / 3) / 101 - half) / 2)
    assert delta["Dupe"] == 0.0  # the duplicate scores below A's true positive and removes no recall
    # confusion at IoU 0.5: rows true a, b, background; columns predicted a, b, background
    assert analysis.class_names == ["a", "b"]
    assert analysis.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [2, 0, 0]]
    # calibration: per score bin, the share of true positives (IoU 0.5, the detection's own class)
    filled = {(round(r["bin_lower"], 1), r["count"], r["precision"]) for r in analysis.calibration if r["count"]}
    assert filled == {(0.9, 2, 1.0), (0.8, 1, 0.0), (0.7, 1, 0.0), (0.6, 1, 0.0)}


def test_confusion_matrix_leaves_out_detections_below_the_threshold():
    analysis = ea.analyse(GT, RESULTS, score_thresh=0.8)
    # the mislocalised and wrong-class boxes are below 0.8: B and C are missed (background column)
    assert analysis.confusion.tolist() == [[1, 0, 1], [0, 1, 1], [1, 0, 0]]


def test_no_detections_is_all_missed_and_an_empty_calibration():
    analysis = ea.analyse(GT, [])
    counts = {e: c for (s, e, c) in ((r["size"], r["error"], r["count"]) for r in analysis.errors) if s == "all"}
    assert counts["Miss"] == 4 and counts["Cls"] == counts["Loc"] == counts["Dupe"] == 0
    assert all(r["count"] == 0 for r in analysis.calibration)
    assert analysis.confusion[:2, 2].tolist() == [2, 2]


def test_coco_from_states_gives_the_same_analysis_as_the_results_entries():
    """torchmetrics' per-image states (xywh, labels) become the same ground truth and detections."""
    states = {
        "groundtruth_box": [torch.tensor([A, B, C, D], dtype=torch.float32), torch.zeros(0, 4)],
        "groundtruth_labels": [torch.tensor([0, 0, 1, 1]), torch.zeros(0, dtype=torch.long)],
        "groundtruth_crowds": [torch.zeros(4, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
        "groundtruth_area": [torch.tensor([float(b[2] * b[3]) for b in (A, B, C, D)]), torch.zeros(0)],
        "detection_box": [torch.tensor([r["bbox"] for r in RESULTS]), torch.tensor([[0.0, 0, 20, 20]])],
        "detection_scores": [torch.tensor([r["score"] for r in RESULTS]), torch.tensor([0.5])],
        "detection_labels": [torch.tensor([r["category_id"] - 1 for r in RESULTS]), torch.tensor([0])],
    }
    gt, results = ea.coco_from_states(states, label_to_cat_id=[1, 2], class_names=["a", "b"])
    assert len(gt["images"]) == 2 and len(gt["annotations"]) == 4 and results.shape == (6, 7)
    assert [a["bbox"] for a in gt["annotations"]] == [A, B, C, D]
    analysis = ea.analyse(gt, results)
    reference = ea.analyse(GT, RESULTS)
    # the one box on the empty second image is a background error, everything else as before
    counts = {r["error"]: r["count"] for r in analysis.errors if r["size"] == "all"}
    assert counts["Bkg"] == 1 and counts["Cls"] == counts["Loc"] == counts["Dupe"] == 1
    assert analysis.confusion[2, 0] == reference.confusion[2, 0] + 1


def test_report_writes_the_error_files(tmp_path):
    written = report_folder.write_report(tmp_path, evaluation=(GT, RESULTS), title="hand-built")
    names = {ea.ERRORS_CSV, ea.ERRORS_PNG, ea.CONFUSION_CSV, ea.CONFUSION_PNG, ea.CALIBRATION_CSV, ea.CALIBRATION_PNG}
    assert set(written) == names
    report = tmp_path / report_folder.REPORT_DIR
    with open(report / ea.ERRORS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(ea.ERRORS_COLUMNS)
    assert len(rows) == len(ea.SIZES) * (len(ea.ERROR_TYPES) + len(ea.ORACLES))
    read = ea.read_errors_csv(report / ea.ERRORS_CSV)
    assert read["all"]["Cls"] == pytest.approx((1 - 51 / 101) / 2, abs=1e-6)
    assert math.isnan(read["small"]["Cls"]) or read["small"]["Cls"] == 0.0  # no small objects
    with open(report / ea.CONFUSION_CSV, newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == ["a", "b", "background"] and table[2] == ["b", "1", "1", "0"]
    for name in (ea.ERRORS_PNG, ea.CONFUSION_PNG, ea.CALIBRATION_PNG):
        with Image.open(report / name) as image:
            assert image.width >= 400 and image.height >= 300


def test_module_keeps_its_evaluation_for_the_report(tmp_path):
    """The evaluated states survive the metric's reset and give the report its error files."""
    module = SAPDLitModule(net=torch.nn.Identity(), label_to_cat_id=[1, 2], class_names=["a", "b"])

    def xyxy(box):
        return [box[0], box[1], box[0] + box[2], box[1] + box[3]]

    preds = [
        {
            "boxes": torch.tensor([xyxy(r["bbox"]) for r in RESULTS], dtype=torch.float32),
            "scores": torch.tensor([r["score"] for r in RESULTS]),
            "labels": torch.tensor([r["category_id"] - 1 for r in RESULTS]),
        }
    ]
    targets = [
        {
            "boxes": torch.tensor([xyxy(b) for b in (A, B, C, D)], dtype=torch.float32),
            "labels": torch.tensor([0, 0, 1, 1]),
            "iscrowd": torch.zeros(4, dtype=torch.long),
            "area": torch.tensor([float(b[2] * b[3]) for b in (A, B, C, D)]),
        }
    ]
    module.evaluator.metric.update(preds, targets)
    module.evaluator.finish("val", step=0)
    gt, results = report_folder.evaluation_of(module)
    analysis = ea.analyse(gt, results)
    assert analysis.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [2, 0, 0]]
    assert np.isclose(analysis.delta_ap("all")["Cls"], (1 - 51 / 101) / 2)


def test_bootstrap_compare_of_a_model_with_itself_is_zero_and_a_better_one_positive():
    same = ea.bootstrap_compare(GT, RESULTS, RESULTS, n_bootstrap=50)
    assert same["AP50"] == {"delta": 0.0, "lower": 0.0, "upper": 0.0}
    fixed = [dict(r) for r in RESULTS]
    fixed[-1]["category_id"] = 2  # the wrong class corrected
    better = ea.bootstrap_compare(GT, RESULTS, fixed, n_bootstrap=50)
    assert better["AP50"]["delta"] == pytest.approx((1 - 51 / 101) / 2)
    assert better["AP50"]["lower"] <= better["AP50"]["delta"] <= better["AP50"]["upper"]


def test_half_precision_states_of_a_mixed_precision_run_are_read():
    """Under bf16-mixed the metric's states can be bfloat16, which NumPy cannot hold."""
    import torch

    from sapd.diagnostics.error_analysis import _numpy

    values = _numpy([torch.tensor([0.5, 0.25], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.float16)])
    assert [v.dtype.name for v in values] == ["float32", "float32"]
    assert values[0].tolist() == [0.5, 0.25]
