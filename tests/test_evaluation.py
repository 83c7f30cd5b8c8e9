"""The COCO evaluator without Lightning: collection, the merge of the processes' shares, scoring, engines."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sapd.evaluation import BOX_STATES, COCO_STATS, COCOEvaluator, coco_metric, merge_evaluations


def _share(ids: list[int], *, results_per_image: int = 2) -> dict:
    """A process's evaluation as COCOEvaluator.share makes it; values tagged by image id."""
    states = {name: [torch.full((1,), float(i)) for i in ids] for name in BOX_STATES}
    results = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": k} for i in ids for k in range(2)]
    return {"image_ids": ids, "states": states, "results": results[: len(ids) * results_per_image]}


def test_merge_keeps_every_image_once_from_its_first_process():
    # a padding DistributedSampler on 5 images and 2 processes: rank 1 gets image 0 again
    states, results, repeated = merge_evaluations([_share([0, 2, 4]), _share([1, 3, 0])])
    assert repeated == 1
    for name in BOX_STATES:
        assert [int(v) for v in states[name]] == [0, 2, 4, 1, 3]
    assert Counter(r["image_id"] for r in results) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 2}
    # the same image twice in one process: its first visit only
    states, results, repeated = merge_evaluations([_share([7, 8, 7])])
    assert repeated == 1 and [int(v) for v in states["detection_box"]] == [7, 8]
    assert Counter(r["image_id"] for r in results) == {7: 2, 8: 2}
    # test-dev: no ground truth, no metric states, results only
    merged = merge_evaluations([{"image_ids": [3], "states": {}, "results": [{"image_id": 3}]}, _share([])])
    assert merged == ({name: [] for name in BOX_STATES}, [{"image_id": 3}], 0)


def _drawn_images(seed: int = 0, n: int = 3, crowd_every: int = 0) -> dict[int, tuple[dict, dict]]:
    """Image id -> (detections, target with ``eval_*`` ground truth) of a few drawn images."""
    gen = torch.Generator().manual_seed(seed)
    images = {}
    for k in range(n):
        boxes = torch.rand(3, 2, generator=gen) * 50
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(3, 2, generator=gen) * 30], dim=1)
        labels = torch.randint(0, 2, (3,), generator=gen)
        det = {"boxes": boxes + torch.rand(3, 4, generator=gen) * 4, "scores": torch.rand(3, generator=gen)}
        det["labels"] = labels
        crowd = torch.zeros(3, dtype=torch.bool)
        if crowd_every and k % crowd_every == 0:
            crowd[0] = True
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target = {"image_id": 11 + k, "eval_boxes": boxes, "eval_labels": labels, "eval_iscrowd": crowd}
        target["eval_area"] = area
        images[11 + k] = (det, target)
    return images


def evaluated(images, order: list[int], results_file=None, step: int = 7):
    evaluator = COCOEvaluator(label_to_cat_id=[5, 7])
    for image_id in order:  # batches of one image, as the module's evaluation steps give them
        det, target = images[image_id]
        evaluator.update([det], [target], collect_results=results_file is not None)
    evaluation, results = evaluator.finish("val", step, results_file)
    assert not evaluator.metric.detection_box and not evaluator.image_ids and not evaluator.results
    return evaluation, results


def test_a_repeated_image_is_scored_once_and_written_once(tmp_path):
    images = _drawn_images()
    once, once_results = evaluated(images, [11, 12, 13], tmp_path / "once.json")
    twice, twice_results = evaluated(images, [11, 12, 13, 11], tmp_path / "twice.json")  # as a padding sampler gives
    assert twice.table == once.table and 0 < once.table["map"] < 1
    assert twice_results == once_results == json.loads((tmp_path / "twice.json").read_text())
    assert Counter(d["image_id"] for d in once_results) == {11: 3, 12: 3, 13: 3}
    assert {d["category_id"] for d in once_results} <= {5, 7}  # the data set's category ids
    assert (once.stage, once.step, once.num_results) == ("val", 7, 9)
    assert once.class_metrics.mean_ap() == pytest.approx(once.table["map"], abs=1e-6)


def test_a_pass_without_ground_truth_or_detections_scores_nothing(tmp_path):
    evaluation, results = COCOEvaluator([5]).finish("test", step=3, results_file=tmp_path / "r.json")
    assert evaluation.table == {} and evaluation.class_metrics is None and results == []
    assert json.loads((tmp_path / "r.json").read_text()) == []  # still a valid (empty) results json


def test_the_evaluator_forgets_the_previous_pass_on_reset():
    images = _drawn_images()
    evaluator = COCOEvaluator([5, 7])
    evaluator.update([images[11][0]], [images[11][1]], collect_results=True)
    evaluator.reset()
    assert not evaluator.image_ids and not evaluator.results and not evaluator.metric.detection_box


def _metric_values(engine: str, preds, targets) -> dict:
    metric = coco_metric(engine)
    metric.update(preds, targets)
    return metric.compute()


@pytest.mark.parametrize("empty", [False, True], ids=["detections", "no-detections"])
def test_hotcoco_scores_as_pycocotools_with_crowd_regions(empty):
    """hotcoco (the default engine) gives pycocotools' 12 stats and precision/recall arrays, exactly, on
    ground truth with crowd regions (a detection on a crowd box is ignored, not a false positive)."""
    gen = torch.Generator().manual_seed(1)
    preds, targets = [], []
    for det, target in _drawn_images(seed=1, n=12, crowd_every=2).values():
        if empty:
            det = {k: v[:0] for k, v in det.items()}
        else:  # and a duplicate of each box, some background
            extra = torch.rand(2, 4, generator=gen) * 60
            extra[:, 2:] += extra[:, :2] + 5
            det = {
                "boxes": torch.cat([det["boxes"], det["boxes"] + 1, extra]),
                "scores": torch.rand(8, generator=gen),
                "labels": torch.cat([det["labels"], det["labels"], torch.tensor([0, 1])]),
            }
        preds.append(det)
        targets.append(
            {
                "boxes": target["eval_boxes"],
                "labels": target["eval_labels"],
                "iscrowd": target["eval_iscrowd"].long(),
                "area": target["eval_area"],
            }
        )
    ours, reference = _metric_values("hotcoco", preds, targets), _metric_values("pycocotools", preds, targets)
    assert [float(ours[k]) for k in COCO_STATS] == [float(reference[k]) for k in COCO_STATS]
    assert torch.equal(ours["precision"], reference["precision"]) and torch.equal(ours["recall"], reference["recall"])
    if not empty:
        assert 0 < float(ours["map"]) < 1
        # the crowd regions matter: without them the numbers differ
        plain = [{**t, "iscrowd": torch.zeros_like(t["iscrowd"])} for t in targets]
        assert float(_metric_values("hotcoco", preds, plain)["map"]) != float(ours["map"])


def test_the_default_engine_is_hotcoco_and_an_unknown_one_is_refused():
    assert COCOEvaluator().metric._coco_backend.backend == "hotcoco"
    with pytest.raises(ValueError, match="unknown COCO engine 'cocoapi'"):
        coco_metric("cocoapi")


def test_the_coco_eval_suite_times_each_engine_and_finds_them_agreeing(tmp_path):
    """``python -m benchmarks suite=coco_eval`` on a small drawn case: a time per engine, the same 12 stats
    from each on the drawn case, the folder with crowd regions and the empty results list."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:  # benchmarks/ sits beside src/
        sys.path.insert(0, str(root))
    from benchmarks import coco_eval

    out = tmp_path / "coco_eval.json"
    report = coco_eval.main(["images=30", "detections=20", f"out={out}"])
    assert set(report["seconds"]) == set(coco_eval.ENGINES) and all(s > 0 for s in report["seconds"].values())
    assert report["drawn_max_diff"]["hotcoco"] == 0.0  # exactly; faster-coco-eval rounds differently
    assert report["drawn_max_diff"]["faster_coco_eval"] < 1e-12
    crowd = report["agreement"]["crowd_folder"]
    assert crowd["quirks"]["crowd_rle"] > 0 and crowd["quirks"]["all_crowd"] == 1
    assert 0 < crowd["pycocotools"][0] < 1
    for case in ("crowd_folder", "empty_results"):
        assert report["agreement"][case]["hotcoco_max_diff"] == 0.0
    assert json.loads(out.read_text())["config"]["images"] == 30
