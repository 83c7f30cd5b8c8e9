"""The evaluate and predict CLIs on a checkpoint trained a few steps, and COCO metric parity."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import TINY, compose_config, run_commands
from sapd.api import Detector
from sapd.checkpoint import CheckpointError, load_detector, load_module
from sapd.diagnostics import class_ap, training_curves
from sapd.diagnostics import error_analysis as ea
from sapd.evaluate import evaluate
from sapd.evaluation import coco_results, eval_targets
from sapd.module import SAPDLitModule
from sapd.predict import PredictError, output_paths, predict
from sapd.predict import main as predict_main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    """The shared checkpoint trained a few steps (tiny model, synthetic data) and its data module."""
    return tiny_checkpoint


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


@pytest.mark.slow
def test_evaluate_writes_the_report(trained, tmp_path, capsys):
    ckpt, datamodule = trained
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "trainer=cpu", "report.num_images=2"], tmp_path)
    table = evaluate(cfg)
    report = tmp_path / "report"
    # the training curves are the checkpoint's run's (its csv/version_*/metrics.csv)
    assert {p.name for p in report.iterdir()} == {
        class_ap.CLASS_CSV,
        class_ap.CLASS_PNG,
        class_ap.PR_PNG,
        training_curves.CURVES_PNG,
        "val_images.png",
        *(ea.ERRORS_CSV, ea.ERRORS_PNG, ea.CONFUSION_CSV, ea.CONFUSION_PNG, ea.CALIBRATION_CSV, ea.CALIBRATION_PNG),
    }
    # the error analysis is of this evaluation: its AP50 is the table's
    errors = ea.read_errors_csv(report / ea.ERRORS_CSV)
    with open(report / ea.ERRORS_CSV, newline="") as fh:
        ap50 = next(float(r["AP50"]) for r in csv.DictReader(fh) if r["size"] == "all")
    assert ap50 == pytest.approx(table["map_50"], abs=1e-5) and set(errors) == set(ea.SIZES)
    with open(report / class_ap.CLASS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(class_ap.CSV_COLUMNS) and len(rows) == datamodule.num_classes
    with_gt = [float(r["AP"]) for r in rows if r["AP"] != ""]
    assert len(with_gt) == sum(int(r["num_gt"]) > 0 for r in rows)
    assert sum(with_gt) / len(with_gt) == pytest.approx(table["map"], abs=1e-5)  # the csv rounds to 1e-6
    assert "Per-class AP" not in capsys.readouterr().out  # printed on request only (report.class_table)
    off = compose_config("eval", [f"ckpt_path={ckpt}", "trainer=cpu", "report.enabled=false"], tmp_path / "off")
    evaluate(off)
    assert not (tmp_path / "off" / "report").exists()
    overrides = [f"ckpt_path={ckpt}", "trainer=cpu", "report.num_images=0", "report.class_table=true"]
    evaluate(compose_config("eval", overrides, tmp_path / "table"))
    printed = capsys.readouterr().out
    assert "Per-class AP" in printed and all(name in printed for name in datamodule.class_names)


def test_evaluate_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        load_module(tmp_path / "nope.ckpt")
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(CheckpointError, match="not a sapd training checkpoint"):
        load_module(bogus)


@pytest.mark.slow
def test_predict_writes_json_and_png_per_image(trained, tmp_path, caplog, monkeypatch):
    ckpt, datamodule = trained
    images = tmp_path / "images"
    images.mkdir()
    val_dir = Path(datamodule.val_dataset.img_dir)
    sources = [images / src.name for src in sorted(val_dir.glob("*.jpg"))[:3]]
    for src in sources:
        shutil.copy(val_dir / src.name, src)
    from PIL import Image

    twin = images / f"{sources[0].stem}.png"  # x.jpg and x.png in one folder: two distinct outputs
    with Image.open(sources[0]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(twin)
    sources.append(twin)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "empty.png").write_bytes(b"")
    batches = []
    run = Detector._run

    def spy(self, group, thresh):
        batches.append(len(group))
        return run(self, group, thresh)

    monkeypatch.setattr(Detector, "_run", spy)
    out = tmp_path / "pred"
    cfg = compose_config(
        "predict",
        [f"ckpt_path={ckpt}", f"input={images}", f"output={out}", "score_thresh=0.0", "batch_size=2"],
        tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="sapd.predict"):
        summary = predict(cfg)
    assert summary["written"] == 4 and sorted(Path(f).name for f in summary["failed"]) == ["broken.jpg", "empty.png"]
    assert sum(batches) == 4 and max(batches) == 2 and len(batches) < 4  # run in batches of up to 2
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{src.name}{ext}" for src in sources for ext in (".json", ".png"))
    docs = {src: json.loads((out / f"{src.name}.json").read_text()) for src in sources}
    assert docs[sources[0]]["file"] != docs[twin]["file"]
    assert docs[sources[0]]["detections"] != docs[twin]["detections"]  # the mirrored twin was run, not overwritten
    for src, doc in docs.items():
        png = out / f"{src.name}.png"
        assert png.is_file() and png.stat().st_size > 0
        with Image.open(src) as orig, Image.open(png) as drawn:
            assert drawn.size == orig.size  # boxes drawn on the original image, original pixels
        assert doc["detections"]  # threshold 0
        for det in doc["detections"]:
            x1, y1, x2, y2 = det["bbox_xyxy"]
            assert 0 <= x1 <= x2 <= doc["width"] and 0 <= y1 <= y2 <= doc["height"]
            assert det["category_id"] in datamodule.label_to_cat_id
            assert det["category_name"] == datamodule.class_names[det["label"]]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "empty.png" in errors[1]
    assert "2 unreadable image(s) skipped: broken.jpg, empty.png" in caplog.text
    assert "wrote 4 predictions" in caplog.text and "2 unreadable skipped" in caplog.text
    assert sorted(p.name for p in images.iterdir()) == sorted([*(s.name for s in sources), "broken.jpg", "empty.png"])


@pytest.mark.slow
def test_predict_fails_when_no_image_can_be_read(trained, tmp_path, caplog):
    ckpt, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not a jpeg")
    (images / "b.png").write_text("nor a png")
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={images}", f"output={tmp_path / 'pred'}"], tmp_path)
    with pytest.raises(PredictError, match=r"none of the 2 input image\(s\) in .*images could be read"):
        predict(cfg)
    caplog.clear()
    with pytest.raises(SystemExit) as exit_info:  # the command: exit code 2, one line saying why
        predict_main(cfg)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[-1].startswith("sapd.predict: none of the 2 input image(s)")
    assert "2 unreadable image(s) skipped: a.jpg, b.png" in caplog.text


def test_predict_refuses_to_write_over_its_inputs(tmp_path, caplog):
    """Checked before the checkpoint is read: the (missing) checkpoint is never reached."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    ckpt = f"ckpt_path={tmp_path / 'never-read.ckpt'}"
    for output, message in (
        (images, r"output=.*images is the input folder"),
        (tmp_path / "images" / ".." / "images", r"is the input folder"),
        (images / "a.jpg", r"output=.*a.jpg exists and is not a folder"),
    ):
        cfg = compose_config("predict", [ckpt, f"input={images}", f"output={output}"], tmp_path)
        with pytest.raises(PredictError, match=message):
            predict(cfg)
    # an output path that resolves to an input file (here through a link left in the output folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.jpg.png").symlink_to(images / "a.jpg")
    cfg = compose_config("predict", [ckpt, f"input={images / 'a.jpg'}", f"output={out}"], tmp_path)
    with pytest.raises(PredictError, match=r"a.jpg.png would overwrite the input image .*images/a.jpg"):
        predict(cfg)
    caplog.clear()
    cfg = compose_config("predict", [ckpt, f"input={images}", f"output={images}"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict_main(cfg)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "is the input folder" in errors[0]
    assert sorted(p.name for p in images.iterdir()) == ["a.jpg"]


def test_predict_output_names_keep_the_suffix():
    assert output_paths(Path("in/x.jpg"), Path("out")) == (Path("out/x.jpg.json"), Path("out/x.jpg.png"))
    assert output_paths(Path("in/x.png"), Path("out"))[1] == Path("out/x.png.png")


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
        module.evaluator.metric.update([det], eval_targets([target]))
        results.extend(coco_results([det], [target], module.label_to_cat_id))
    ours = module.evaluator.metric.compute()

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
    with caplog.at_level(logging.WARNING, logger="sapd"):
        detector, _ = load_detector(old)  # the loader without Lightning reads it alike
    assert detector.net.criterion.eta == 2.0 and detector.net.postprocessor == new.net.postprocessor


@pytest.mark.slow
def test_checkpoint_whose_config_cannot_build_is_one_clear_error(trained, tmp_path):
    ckpt_path, _ = trained
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["sapd_config"]["model"]["criterion"]["topk"] = 0
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    for load in (load_module, load_detector):
        with pytest.raises(CheckpointError, match=r"cannot rebuild the model of .*bad.ckpt.*model.criterion.topk"):
            load(bad)


@pytest.mark.slow
def test_one_builder_for_training_and_loading(trained):
    """load_module and training build the module through sapd.build.build_module: same classes, same net;
    load_detector builds the same net (sapd.build.build_net) with the same weights and classes."""
    ckpt_path, datamodule = trained
    module, run_cfg = load_module(ckpt_path)
    assert module.label_to_cat_id == list(datamodule.label_to_cat_id)
    assert module.class_names == list(datamodule.class_names)
    assert module.optimizer_factory is not None  # the run's optimiser is rebuilt too (fine-tuning from it works)
    assert type(module.net).__name__ == run_cfg.model._target_.rsplit(".", 1)[1]
    detector, detector_cfg = load_detector(ckpt_path)
    assert detector_cfg == run_cfg and not detector.net.training
    assert (detector.label_to_cat_id, detector.class_names) == (module.label_to_cat_id, module.class_names)
    ours, theirs = detector.net.state_dict(), module.net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_evaluate_takes_the_checkpoints_data_unless_a_data_config_is_chosen(trained, tmp_path, monkeypatch):
    ckpt, datamodule = trained
    assert compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path).get("data") is None  # the checkpoint's
    # the README's test-dev command builds the COCO data module at the given root
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "split=test", "data=coco", "data.root=/nowhere/coco"], tmp_path)
    assert cfg.data._target_.endswith("COCODataModule") and cfg.data.root == "/nowhere/coco"
    # a chosen data config is the one evaluated: 3 of the checkpoint's 8 val images (the tiny synthetic
    # set, already drawn: the default one would draw 2250 images first)
    results = tmp_path / "chosen.json"
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"results_file={results}",
            "trainer=cpu",
            "score_thresh=0.0",
            "data=synthetic",
            *[o for o in TINY if o.startswith("data.")],
            "data.limit_val_images=3",
        ],
        tmp_path,
    )
    evaluate(cfg)
    assert len({d["image_id"] for d in json.loads(results.read_text())}) == 3


@pytest.mark.slow
def test_evaluate_takes_data_keys_without_a_data_config(trained, tmp_path):
    """``python -m sapd.evaluate ckpt_path=... data.KEY=VALUE`` changes the checkpoint's data config;
    a key it does not have is one line, exit status 2. Both as a user runs them (Hydra parses the command
    line), in one process."""
    ckpt, _ = trained
    results = tmp_path / "results.json"
    common = [f"ckpt_path={ckpt}", "trainer=cpu", "report.enabled=false"]
    done = [*common, f"results_file={results}", "score_thresh=0.0", "data.limit_val_images=2"]
    wrong = [*common, "data.val_anns=x.json"]
    runs = [("sapd.evaluate", [*done, f"hydra.run.dir={tmp_path / 'a'}"], {})]
    runs.append(("sapd.evaluate", [*wrong, f"hydra.run.dir={tmp_path / 'b'}"], {}))
    out = tmp_path / "console"
    codes = run_commands(runs, out, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    assert codes[0] == 0, (out / "0.out").read_text()[-3000:]
    assert len({d["image_id"] for d in json.loads(results.read_text())}) == 2
    text = (out / "1.out").read_text()
    lines = [ln for ln in text.splitlines() if "sapd.evaluate:" in ln]
    assert codes[1] == 2 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert "data.val_anns is not a key of the checkpoint's data config" in lines[0]
