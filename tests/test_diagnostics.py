"""The run report (sapd.diagnostics): per-class AP and PR curves from COCOeval's arrays, training curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision

from sapd.diagnostics import class_ap, report_folder, training_curves
from sapd.evaluation import ClassMetrics, COCOEvaluator
from sapd.module import SAPDLitModule

NUM_CLASSES = 6


def random_eval_set(seed: int = 0, num_images: int = 40):
    """Detections and ground truth with every case: a class with detections only (2), a class with
    ground truth only (5), a class with neither (4), crowd boxes, jittered true positives, false positives."""
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(num_images):
        m = int(torch.randint(1, 7, (1,), generator=gen))
        xy = torch.rand(m, 2, generator=gen) * 200
        boxes = torch.cat([xy, xy + torch.rand(m, 2, generator=gen) * 80 + 8], dim=1)
        labels = torch.tensor([0, 1, 3, 5])[torch.randint(0, 4, (m,), generator=gen)]
        crowd = (torch.rand(m, generator=gen) < 0.1).long()
        keep = (torch.rand(m, generator=gen) > 0.25) & (labels != 5)  # some missed, class 5 never detected
        det = boxes[keep] + torch.randn(int(keep.sum()), 4, generator=gen) * 4
        fp_xy = torch.rand(4, 2, generator=gen) * 200
        fp = torch.cat([fp_xy, fp_xy + 30], dim=1)
        fp_labels = torch.tensor([0, 1, 2, 3])[torch.randint(0, 4, (4,), generator=gen)]
        det_boxes = torch.cat([det, fp])
        preds.append(
            {
                "boxes": det_boxes,
                "labels": torch.cat([labels[keep], fp_labels]),
                "scores": torch.rand(len(det_boxes), generator=gen),
            }
        )
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        targets.append({"boxes": boxes, "labels": labels, "iscrowd": crowd, "area": area})
    return preds, targets


def evaluated_module(preds, targets) -> tuple[SAPDLitModule, dict[str, float], ClassMetrics]:
    module = SAPDLitModule(net=torch.nn.Identity(), label_to_cat_id=[10 + k for k in range(NUM_CLASSES)])
    module.evaluator.metric.update(preds, targets)
    evaluation, _ = module.evaluator.finish("val", step=0)
    return module, evaluation.table, evaluation.class_metrics


def test_per_class_ap_averages_to_map_and_equals_per_class_cocoeval():
    preds, targets = random_eval_set()
    _, table, per_class = evaluated_module(preds, targets)
    assert per_class is not None and per_class.num_classes == NUM_CLASSES
    assert 0.05 < table["map"] < 0.95  # non-trivial
    # COCO's map is the mean over the classes with ground truth: exactly, each has 10 x 101 entries
    assert per_class.has_gt.tolist() == [True, True, False, True, False, True]
    assert per_class.mean_ap() == pytest.approx(table["map"], abs=1e-6)
    assert float(per_class.ap50[per_class.has_gt].double().mean()) == pytest.approx(table["map_50"], abs=1e-6)
    assert float(per_class.ap75[per_class.has_gt].double().mean()) == pytest.approx(table["map_75"], abs=1e-6)
    assert float(per_class.ap[5]) == 0.0  # ground truth, never detected

    # the same numbers from COCOeval run once per class (torchmetrics' class_metrics), for AP and AP50
    for ious, ours in ((None, per_class.ap), ([0.5], per_class.ap50)):
        reference = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", class_metrics=True, iou_thresholds=ious
        )
        reference.update(preds, targets)
        values = reference.compute()
        expected = torch.full((NUM_CLASSES,), float("nan"))
        expected[values["classes"].long()] = values["map_per_class"].float()
        expected[expected < 0] = float("nan")  # -1: no ground truth
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0, equal_nan=True)

    # non-crowd ground-truth boxes per class
    labels = torch.cat([t["labels"] for t in targets])
    crowd = torch.cat([t["iscrowd"] for t in targets]).bool()
    assert per_class.num_gt.tolist() == torch.bincount(labels[~crowd], minlength=NUM_CLASSES).tolist()


def test_overall_numbers_unchanged_by_the_extended_summary():
    preds, targets = random_eval_set(seed=3)
    _, table, _ = evaluated_module(preds, targets)
    plain = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    plain.update(preds, targets)
    values = plain.compute()
    for key, value in table.items():
        assert value == pytest.approx(float(values[key]), abs=1e-7), key


def test_pr_curves_are_non_increasing_and_end_at_the_largest_recall():
    preds, targets = random_eval_set(seed=1)
    _, _, per_class = evaluated_module(preds, targets)
    reference = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", extended_summary=True
    )
    reference.update(preds, targets)
    values = reference.compute()
    recall_at_50 = dict(zip(values["classes"].tolist(), values["recall"][0, :, 0, -1].tolist()))
    for label in range(NUM_CLASSES):
        recall, precision = class_ap.pr_curve(per_class, label)
        if not bool(per_class.has_gt[label]):
            assert len(recall) == 0
            continue
        assert np.all(np.diff(recall) >= 0) and np.all(np.diff(precision) <= 1e-12)
        assert recall[-1] == pytest.approx(recall_at_50[label], abs=1e-6)
        # AP50 is the mean of the interpolated precision over the 101 recall thresholds
        assert float(per_class.precision50[:, label].clamp(min=0).mean()) == pytest.approx(
            float(per_class.ap50[label]), abs=1e-6
        )


def test_pr_curve_of_a_hand_computed_case():
    """Two true boxes; detections: hit (0.9), miss (0.8), hit (0.7). Precision 1, 1/2, 2/3 at recall
    1/2, 1/2, 1; interpolated: 1 up to recall 0.5, then 2/3 up to recall 1."""
    gt = {"boxes": torch.tensor([[0.0, 0, 20, 20], [50, 50, 80, 80]]), "labels": torch.tensor([0, 0])}
    det = {
        "boxes": torch.tensor([[0.0, 0, 20, 20], [100, 100, 120, 120], [50, 50, 80, 80]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([0, 0, 0]),
    }
    evaluator = COCOEvaluator([1])
    evaluator.metric.update([det], [gt])
    per_class = evaluator.score()[1]
    recall, precision = class_ap.pr_curve(per_class, 0)
    assert recall[-1] == 1.0
    np.testing.assert_allclose(precision[recall <= 0.5], 1.0)
    np.testing.assert_allclose(precision[recall > 0.5], 2 / 3, atol=1e-6)
    assert float(per_class.ap50[0]) == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    assert per_class.num_gt.tolist() == [2]


def test_class_csv_and_console_table(tmp_path):
    preds, targets = random_eval_set()
    module, _, per_class = evaluated_module(preds, targets)
    names = [f"shape{k}" for k in range(NUM_CLASSES)]
    rows = class_ap.class_rows(per_class, names, module.label_to_cat_id)
    path = class_ap.write_class_csv(rows, tmp_path / "class_ap.csv")
    with open(path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == list(class_ap.CSV_COLUMNS)
    assert [r["label"] for r in read] == [str(k) for k in range(NUM_CLASSES)]
    assert [r["category_id"] for r in read] == [str(10 + k) for k in range(NUM_CLASSES)]
    assert read[4]["AP"] == "" and read[4]["num_gt"] == "0"  # class 4: no ground truth
    assert float(read[0]["AP"]) == pytest.approx(float(per_class.ap[0]), abs=1e-6)
    table = class_ap.format_class_table(rows, title="Per-class AP (%)")
    lines = table.splitlines()
    assert len(lines) == 2 + NUM_CLASSES and "shape4" in lines[6] and lines[6].split()[2] == "n/a"


def hand_made_metrics_csv(path: Path, rows: list[dict]) -> Path:
    """A file as Lightning's CSV logger writes it: one header of every key, empty cells elsewhere."""
    keys = ["epoch", "lr-AdamW/pg1", "lr-AdamW/pg2", "step", "train/total_step", "train/cls", "val/loss", "val/map"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    return path


def test_training_curves_from_hand_made_metrics_csv(tmp_path):
    first = hand_made_metrics_csv(
        tmp_path / "run" / "csv" / "version_0" / "metrics.csv",
        [
            {"step": 0, "lr-AdamW/pg1": 1e-4, "lr-AdamW/pg2": 1e-4},
            {"epoch": 0, "step": 0, "train/total_step": 3.0, "train/cls": 2.0},
            {"step": 9, "lr-AdamW/pg1": 1e-3, "lr-AdamW/pg2": 1e-3},
            {"epoch": 0, "step": 9, "train/total_step": 2.0, "train/cls": 1.5},
            {"epoch": 0, "step": 9, "val/loss": 2.5, "val/map": 0.1},
            {"epoch": 1, "step": 19, "train/total_step": 1.9, "train/cls": 1.4},  # resumed from step 10 below
        ],
    )
    assert training_curves.find_metrics_csv(tmp_path / "run") == [first]
    series = training_curves.read_metrics([first])
    steps, epochs, values = series["train/total_step"]
    assert steps.tolist() == [0, 9, 19] and epochs.tolist() == [0, 0, 1] and values.tolist() == [3.0, 2.0, 1.9]
    assert series["val/map"][2].tolist() == [0.1] and series["lr-AdamW/pg1"][0].tolist() == [0, 9]

    # a run resumed at step 10: the earlier file's rows from step 10 on are replaced by the later ones
    second = hand_made_metrics_csv(
        tmp_path / "resumed" / "metrics.csv",
        [
            {"epoch": 1, "step": 10, "train/total_step": 1.8, "train/cls": 1.3},
            {"epoch": 1, "step": 19, "val/loss": 2.0, "val/map": 0.3},
        ],
    )
    joined = training_curves.read_metrics([first, second])
    assert joined["train/total_step"][0].tolist() == [0, 9, 10]
    assert joined["train/total_step"][2].tolist() == [3.0, 2.0, 1.8]
    assert joined["val/map"][1].tolist() == [0, 1] and joined["val/map"][2].tolist() == [0.1, 0.3]

    png = training_curves.plot_training_curves(joined, tmp_path / "curves.png", "hand-made run")
    with Image.open(png) as image:
        assert image.width > 800 and image.height > 300


def test_write_report_writes_the_parts_it_has_inputs_for(tmp_path):
    preds, targets = random_eval_set()
    module, _, per_class = evaluated_module(preds, targets)
    written = report_folder.write_report(tmp_path, class_metrics=per_class, label_to_cat_id=module.label_to_cat_id)
    assert set(written) == {class_ap.CLASS_CSV, class_ap.CLASS_PNG, class_ap.PR_PNG}
    assert all(p.parent == tmp_path / "report" and p.stat().st_size > 0 for p in written.values())
    # more classes than one axes holds: a grid of small plots
    big = ClassMetrics(
        ap=per_class.ap.repeat(3),
        ap50=per_class.ap50.repeat(3),
        ap75=per_class.ap75.repeat(3),
        num_gt=per_class.num_gt.repeat(3),
        precision50=per_class.precision50.repeat(1, 3),
        recall50=per_class.recall50.repeat(3),
        rec_thresholds=per_class.rec_thresholds,
    )
    assert int(big.has_gt.sum()) > class_ap.SINGLE_AXES_MAX_CLASSES
    class_ap.plot_pr_curves(big, tmp_path / "grid.png", "many classes")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert report_folder.write_report(tmp_path / "empty") == {}
    assert not math.isnan(big.mean_ap())
