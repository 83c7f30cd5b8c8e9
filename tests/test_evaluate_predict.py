"""The evaluate and predict CLIs on a checkpoint trained a few steps, and COCO metric parity."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import compose_config
from sapd.checkpoint import CheckpointError, load_module
from sapd.evaluate import evaluate
from sapd.module import SAPDLitModule
from sapd.predict import predict
from sapd.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained a few steps (tiny model, synthetic data) and its run config."""
    out = tmp_path_factory.mktemp("run")
    from conftest import TINY

    cfg = compose_config(
        "train",
        [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=3", "validate_best=false"],
        out,
    )
    _, objects = train(cfg)
    ckpt = Path(out) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt, objects["datamodule"]


@pytest.mark.slow
def test_evaluate_prints_table_and_writes_results(trained, tmp_path, capsys):
    ckpt, datamodule = trained
    results = tmp_path / "results.json"
    cfg = compose_config(
        "eval", [f"ckpt_path={ckpt}", f"results_file={results}", "trainer=cpu", "score_thresh=0.0"], tmp_path
    )
    table = evaluate(cfg)
    assert set(table) >= {"map", "map_50", "map_75", "map_small", "map_medium", "map_large"}
    printed = capsys.readouterr().out
    assert "AP50" in printed and str(results) in printed
    dets = json.loads(results.read_text())
    assert dets  # threshold 0: up to 100 detections per image
    valid_ids = set(datamodule.label_to_cat_id)
    assert {d["category_id"] for d in dets} <= valid_ids  # original COCO ids, not contiguous labels
    assert {d["image_id"] for d in dets} <= set(datamodule.val_dataset.coco.getImgIds())
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0 for d in dets)


def test_evaluate_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        load_module(tmp_path / "nope.ckpt")
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(CheckpointError, match="not a sapd training checkpoint"):
        load_module(bogus)


@pytest.mark.slow
def test_predict_writes_json_and_png_per_image(trained, tmp_path, caplog):
    ckpt, datamodule = trained
    images = tmp_path / "images"
    images.mkdir()
    val_dir = Path(datamodule.val_dataset.img_dir)
    sources = sorted(val_dir.glob("*.jpg"))[:2]
    for src in sources:
        shutil.copy(src, images / src.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    cfg = compose_config(
        "predict", [f"ckpt_path={ckpt}", f"input={images}", f"output={out}", "score_thresh=0.0"], tmp_path
    )
    with caplog.at_level(logging.INFO, logger="sapd.predict"):
        summary = predict(cfg)
    assert summary["written"] == 2 and len(summary["failed"]) == 1 and "broken.jpg" in summary["failed"][0]
    for src in sources:
        doc = json.loads((out / f"{src.stem}.json").read_text())
        png = out / f"{src.stem}.png"
        assert png.is_file() and png.stat().st_size > 0
        from PIL import Image

        with Image.open(src) as orig, Image.open(png) as drawn:
            assert drawn.size == orig.size  # boxes drawn on the original image, original pixels
        for det in doc["detections"]:
            x1, y1, x2, y2 = det["bbox_xyxy"]
            assert 0 <= x1 <= x2 <= doc["width"] and 0 <= y1 <= y2 <= doc["height"]
            assert det["category_id"] in datamodule.label_to_cat_id
            assert det["category_name"] == datamodule.class_names[det["label"]]
    assert any("broken.jpg" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert "wrote 2 predictions" in caplog.text and "1 unreadable skipped" in caplog.text


@pytest.mark.slow
def test_predict_missing_input(trained, tmp_path):
    ckpt, _ = trained
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={tmp_path / 'none'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict(cfg)


@pytest.mark.slow
def test_metric_equals_pycocotools_cocoeval(tmp_path):
    """The module's COCO numbers equal COCOeval run directly on the results json and annotations.

    Detections are made from the ground truth (jittered, some dropped, false positives added, random
    scores) so every AP term is non-trivial; crowd regions and annotation areas are in play.
    """
    cfg = compose_config(
        "train",
        [
            "data.synthetic.num_train=4",
            "data.synthetic.num_val=24",
            "data.synthetic.crowd_frac=0.3",
            "data.num_workers=0",
            "logger=none",
        ],
        tmp_path,
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    ds = datamodule.val_dataset
    module = SAPDLitModule(
        net=torch.nn.Identity(), optimizer=torch.optim.SGD, label_to_cat_id=datamodule.label_to_cat_id
    )
    gen = torch.Generator().manual_seed(0)
    results = []
    for i in range(len(ds)):
        _, target = ds[i]
        keep = ~target["eval_iscrowd"]
        boxes, labels = target["eval_boxes"][keep], target["eval_labels"][keep]
        drop = torch.rand(len(boxes), generator=gen) < 0.2
        boxes, labels = boxes[~drop], labels[~drop]
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        boxes = boxes + 0.15 * wh * (torch.rand(boxes.shape, generator=gen) - 0.5)
        fp = torch.rand(3, 4, generator=gen) * 120
        fp = torch.cat([fp[:, :2], fp[:, :2] + fp[:, 2:] / 2 + 4], dim=1)
        boxes = torch.cat([boxes, fp])
        labels = torch.cat([labels, torch.randint(0, datamodule.num_classes, (3,), generator=gen)])
        det = {"boxes": boxes, "labels": labels, "scores": torch.rand(len(boxes), generator=gen)}
        module.val_map.update([det], module.eval_targets([target]))
        results.extend(module.to_coco_results([det], [target]))
    ours = module.val_map.compute()

    gt = COCO(str(ds.ann_file))
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    assert ev.stats[0] > 0.2  # non-trivial
    np.testing.assert_allclose([float(ours[k]) for k in keys], ev.stats[:6], atol=2e-3)


def test_predict_uses_the_evaluation_size_of_the_run():
    from omegaconf import OmegaConf

    from sapd.predict import eval_size

    assert eval_size(OmegaConf.create({"min_size": [640, 800], "max_size": 1333})) == (800, 1333)
    run = {"min_size": 224, "max_size": 320, "val_min_size": 320, "val_max_size": 480}
    assert eval_size(OmegaConf.create(run)) == (320, 480)
    assert eval_size(OmegaConf.create({**run, "val_max_size": None})) == (320, 320)


@pytest.mark.slow
def test_checkpoint_of_the_flat_config_layout_loads_with_a_warning(trained, tmp_path, caplog):
    """Checkpoints written before model.criterion / model.postprocess existed still load, and say so."""
    ckpt_path, _ = trained
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = ckpt["sapd_config"]["model"]
    criterion, post = model.pop("criterion"), model.pop("postprocess")
    model.update({k: v for k, v in criterion.items() if k != "_target_"})
    model.update({k: v for k, v in post.items() if k != "_target_"})
    model["eta"] = 2.0  # a non-default value must reach the rebuilt criterion
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with caplog.at_level(logging.WARNING, logger="sapd"):
        module, run_cfg = load_module(old)
    assert "model.eta -> model.criterion.eta" in caplog.text and "model.score_thresh" in caplog.text
    assert module.net.criterion.eta == 2.0 and run_cfg.model.criterion.eta == 2.0
    new, _ = load_module(ckpt_path)
    assert module.net.postprocessor == new.net.postprocessor
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(module(images)["cls_logits"], new(images)["cls_logits"])


@pytest.mark.slow
def test_checkpoint_whose_config_cannot_build_is_one_clear_error(trained, tmp_path):
    ckpt_path, _ = trained
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["sapd_config"]["model"]["criterion"]["topk"] = 0
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"cannot rebuild the model of .*bad.ckpt.*model.criterion.topk"):
        load_module(bad)


@pytest.mark.slow
def test_one_builder_for_training_and_loading(trained):
    """load_module and training build the module through sapd.build.build_module: same classes, same net."""
    ckpt_path, datamodule = trained
    module, run_cfg = load_module(ckpt_path)
    assert module.label_to_cat_id == list(datamodule.label_to_cat_id)
    assert module.class_names == list(datamodule.class_names)
    assert module.optimizer_factory is not None  # the run's optimiser is rebuilt too (fine-tuning from it works)
    assert type(module.net).__name__ == run_cfg.model._target_.rsplit(".", 1)[1]


@pytest.mark.slow
def test_evaluate_takes_the_checkpoints_data_unless_a_data_config_is_chosen(trained, tmp_path, monkeypatch):
    ckpt, datamodule = trained
    assert compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path).get("data") is None  # the checkpoint's
    # the README's test-dev command builds the COCO data module at the given root
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "split=test", "data=coco", "data.root=/nowhere/coco"], tmp_path)
    assert cfg.data._target_.endswith("COCODataModule") and cfg.data.root == "/nowhere/coco"
    # a chosen data config is the one evaluated: a smaller synthetic validation set scores fewer images
    results = tmp_path / "chosen.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"results_file={results}",
            "trainer=cpu",
            "score_thresh=0.0",
            "data=synthetic",
            "data.limit_val_images=3",
            "data.num_workers=0",
        ],
        tmp_path,
    )
    evaluate(cfg)
    assert len({d["image_id"] for d in json.loads(results.read_text())}) == 3
