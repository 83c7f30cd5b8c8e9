"""Outputs stay useful when the model is weak: a model trained a few steps, whose scores sit
near the 0.01 prior, gives files that standard tools load, an export whose threshold can be chosen and
whose check compares detections, and tables that say ``n/a`` where nothing can be measured."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY, compose_config
from sapd import export as sapd_export
from sapd.data import DataError
from sapd.data.datamodule import COCODataModule
from sapd.errors import UserError
from sapd.evaluate import evaluate
from sapd.export import ExportedModel, example_inputs, match_detections, parity_ok
from sapd.paths import initialize_configs
from sapd.utils import format_coco_table


@pytest.fixture(scope="module")
def weak(tiny_checkpoint):
    """A tiny SAPD trained 3 steps (the shared checkpoint): (last.ckpt, its data module)."""
    return tiny_checkpoint


def export_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("export", overrides=list(overrides))


def test_the_parity_check_fails_when_it_compared_no_detection():
    nothing = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}
    stats = match_detections([nothing, nothing], [nothing, nothing])
    assert stats["detections"] == 0 and stats["unmatched"] == stats["count_diff"] == 0
    assert not parity_ok(stats)


@pytest.mark.slow
def test_export_takes_score_thresh_and_its_check_compares_detections(weak, tmp_path):
    ckpt, _ = weak
    images, sizes = example_inputs(32, batch=2)
    # the checkpoint's 0.05 keeps nothing of a 3-step model: the check lowers its threshold to compare some
    out = tmp_path / "default.torchscript.pt"
    result = sapd_export.export(export_config(f"ckpt_path={ckpt}", "format=torchscript", f"output={out}"))
    assert ExportedModel(out)(images.numpy(), sizes.numpy())[3].sum() == 0
    parity = result["parity"]
    assert parity["detections"] > 0 and parity_ok(parity) and parity["score_thresh"] < 0.05
    # score_thresh= is baked into the graph and written in the metadata
    out = tmp_path / "low.torchscript.pt"
    result = sapd_export.export(
        export_config(f"ckpt_path={ckpt}", "format=torchscript", f"output={out}", "score_thresh=0.0")
    )
    assert json.loads((tmp_path / "low.torchscript.pt.json").read_text())["postprocess"]["score_thresh"] == 0.0
    boxes, scores, labels, counts = ExportedModel(out)(images.numpy(), sizes.numpy())
    assert (counts > 0).all() and result["parity"]["score_thresh"] == 0.0 and parity_ok(result["parity"])


def test_export_refuses_a_score_thresh_outside_0_1(tmp_path):
    with pytest.raises(UserError, match=r"score_thresh must be a finite number in \[0, 1\)"):
        sapd_export.export(export_config(f"ckpt_path={tmp_path / 'x.ckpt'}", "score_thresh=1.5"))


@pytest.mark.slow
def test_evaluation_without_detections_writes_an_empty_results_file_and_says_so(weak, tmp_path, caplog):
    ckpt, _ = weak
    overrides = [f"ckpt_path={ckpt}", "trainer=cpu", "report.enabled=false", "score_thresh=0.9"]
    cfg = compose_config("eval", overrides, tmp_path)
    with caplog.at_level(logging.WARNING, logger="sapd.module"):
        table = evaluate(cfg)
    assert table["map"] == 0.0  # scored, not crashed
    results = tmp_path / "results_val.json"
    assert json.loads(results.read_text()) == []
    lines = [r.getMessage() for r in caplog.records if "no detections" in r.getMessage()]
    assert len(lines) == 1 and str(results) in lines[0] and "COCO.loadRes" in lines[0] and "0.9" in lines[0]


def test_a_metric_without_ground_truth_prints_n_a():
    table = {"map": 0.5, "map_50": 0.75, "map_75": 0.0, "map_small": -1.0, "map_medium": 0.125, "map_large": -1.0}
    head, row = format_coco_table(table).splitlines()[1:]
    assert row.split() == ["50.0", "75.0", "0.0", "n/a", "12.5", "n/a"] and "-100" not in row
    assert len(row) == len(head)  # the columns stay aligned
    assert format_coco_table({})[-3:] == "n/a"  # nothing measured at all


def test_an_empty_validation_set_is_refused_in_one_line(tmp_path):
    from sapd.data.synthetic import make_synthetic_coco

    cfg = compose_config("train", [*TINY], tmp_path / "run")
    root = make_synthetic_coco(tmp_path / "set", **OmegaConf.to_container(cfg.data.synthetic))
    ann = json.loads((root / "annotations" / "instances_val.json").read_text())
    empty = tmp_path / "empty_val.json"
    empty.write_text(json.dumps({**ann, "images": [], "annotations": []}))
    dm = COCODataModule(root, train_ann="annotations/instances_train.json", train_images="train",
                        val_ann=str(empty), val_images="val", num_workers=0)  # fmt: skip
    with pytest.raises(DataError, match="the validation set has no image, so nothing can be scored") as e:
        dm.setup("fit")
    assert str(empty) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_evaluation_whose_images_are_all_left_out_is_refused_in_one_line(weak, tmp_path):
    ckpt, datamodule = weak
    from sapd.data.synthetic import make_synthetic_coco

    synthetic = dict(datamodule.synthetic)
    root = make_synthetic_coco(tmp_path / "set", **synthetic)
    for image in (root / "val").glob("*.jpg"):
        image.unlink()
    cfg = compose_config(
        "eval",
        [f"ckpt_path={ckpt}", "trainer=cpu", "report.enabled=false", "data=synthetic", f"data.root={root}",
         "data.skip_bad_images=true", "data.num_workers=0", *[o for o in TINY if o.startswith("data.synthetic")]],
        tmp_path / "eval",
    )  # fmt: skip
    with pytest.raises(DataError) as e:
        evaluate(cfg)
    n = synthetic["num_val"]
    assert str(e.value).startswith(f"no val image could be scored: every one evaluated was left out ({n} missing")


def test_boxes_without_area_are_never_returned():
    """Small boxes at every anchor point, also in the padding right of and below the smaller image: those
    are clipped to no width or height and dropped, by the eager post-processing and the exported graph alike."""
    from sapd.models.postprocess import postprocess_detections

    strides = [8, 16, 32, 64, 128]
    level_sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    features = [torch.zeros(2, 1, h, w) for h, w in level_sizes]
    p = sum(h * w for h, w in level_sizes)
    cls = torch.full((2, p, 2), -8.0)
    cls[..., 0] = 3.0 + torch.rand(2, p, generator=torch.Generator().manual_seed(0))  # distinct scores, one class
    reg = torch.full((2, p, 4), 0.01)  # boxes of 0.6-10 px around their points: no two overlap on a level
    sizes = torch.tensor([[64, 96], [50, 70]])
    ref = postprocess_detections(cls, reg, level_sizes, strides, sizes.tolist(), max_detections=1000)
    out = sapd_export.scripted_detect()(cls, reg, features, sizes, strides, 4.0, 0.05, 1000, 0.5, 1000)
    exported = sapd_export.to_original_pixels(*out, sizes.tolist())
    for r, e in zip(ref, exported):
        for boxes in (r["boxes"], torch.from_numpy(e["boxes"])):
            assert len(boxes) > 0 and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert len(ref[1]["boxes"]) < len(ref[0]["boxes"])  # the points over the second image's padding gave none
    stats = match_detections([{k: v.numpy() for k, v in r.items()} for r in ref], exported)
    assert parity_ok(stats) and stats["max_abs_box"] == 0


@pytest.mark.slow
def test_score_threshold_counts_the_ground_truth_evaluation_scores(weak, tmp_path):
    """benchmarks.score_threshold on a set whose annotations hold boxes evaluation drops (zero width or
    height): they are not ground truth there either, so recall is measured against the boxes scored."""
    from benchmarks.score_threshold import Config, measure

    ckpt, _ = weak
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in (1, 2):
        Image.new("RGB", (128, 96), (30 * i, 90, 160)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 128, "height": 96})
        for bbox in ([10, 10, 40, 30], [60, 20, 0, 30], [70, 40, 25, 0]):  # a box, then two without area
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": bbox, "iscrowd": 0})
    categories = [{"id": 1, "name": "box"}]
    (tmp_path / "val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    raw = torch.load(ckpt, weights_only=False)
    data = raw["sapd_config"]["data"]
    for key in ("synthetic", "cache_dir"):
        data.pop(key, None)
    data.update(_target_="sapd.data.datamodule.COCODataModule", root=str(tmp_path), val_ann="val.json",
                val_images="images", train_ann="val.json", train_images="images", num_workers=0)  # fmt: skip
    moved = tmp_path / "moved.ckpt"
    torch.save(raw, moved)
    rows, num_gt = measure(Config(ckpt_path=str(moved), thresholds=[0.0, 0.5], device="cpu"))
    assert num_gt == 2  # one scored box per image; the four without area are not ground truth
    assert rows[0]["dets"] > 0 and rows[0]["recall"] <= 1.0
