"""A run that learns nothing does not end as a success: it stops with one line and exit
status 2 before a best checkpoint is kept (sapd.callbacks.LearningCheck, ``learning_check`` in conf/train.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY, compose_config, train_with
from sapd.callbacks import NothingLearnedError
from sapd.errors import ConfigError, UserError
from sapd.train import train

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]


def _no_best_checkpoint(run: Path) -> None:
    """Nothing of the run was kept as its best, and no summary reports it as finished."""
    assert not list((run / "checkpoints").glob("epoch_*.ckpt"))
    assert not (run / "summary.json").exists()


class Poison(L.Callback):
    """Sets one weight of the detector to NaN after the first training step (a diverged update)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            with torch.no_grad():
                pl_module.net.head.cls_out.weight[0, 0, 0, 0] = float("nan")


class NanFocalGamma(L.Callback):
    """Makes every loss NaN from the first step on: the real criterion with gamma NaN, set past the config checks."""

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.net.criterion.focal_gamma = float("nan")


@pytest.mark.slow
def test_infinite_learning_rate_stops_the_run(train_cfg, tmp_path):
    with pytest.raises(UserError) as e:
        train(train_cfg(*SHORT, "optim.optimizer.lr=inf"))
    assert "optim.optimizer.lr" in str(e.value) and "\n" not in str(e.value)
    _no_best_checkpoint(tmp_path)


@pytest.mark.slow
def test_weights_that_turn_nan_stop_the_run_naming_the_parameter(train_cfg, tmp_path):
    with pytest.raises(NothingLearnedError) as e:
        train_with(train_cfg(*SHORT), Poison())
    msg = str(e.value)
    assert msg.startswith("training diverged: parameter net.head.cls_out.weight is NaN or infinite")
    assert "optim.optimizer.lr" in msg and "\n" not in msg
    _no_best_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["model.criterion.focal_gamma=nan", "model.criterion.lambda_select=inf"])
def test_settings_that_skip_every_step_stop_the_run(train_cfg, tmp_path, setting):
    with pytest.raises(UserError):  # refused up front, or stopped for its skipped steps
        train(train_cfg(*SHORT, setting))
    _no_best_checkpoint(tmp_path)


@pytest.mark.slow
def test_more_skipped_steps_than_the_configured_fraction_stop_the_run(train_cfg, tmp_path):
    with pytest.raises(NothingLearnedError) as e:
        train_with(train_cfg(*SHORT), NanFocalGamma())
    msg = str(e.value)
    assert msg.startswith("3 of 3 training steps were skipped") and "max_skipped_fraction=0.1" in msg
    _no_best_checkpoint(tmp_path)
    # the threshold is the config's: a run allowed to skip every step ends
    run = tmp_path / "tolerant"
    cfg = compose_config("train", [*TINY, *SHORT, "learning_check.max_skipped_fraction=1"], run)
    train_with(cfg, NanFocalGamma())
    assert (run / "summary.json").is_file()


def test_the_skipped_fraction_is_checked_before_any_data(train_cfg):
    with pytest.raises(ConfigError, match=r"learning_check.max_skipped_fraction must be a finite number in \[0, 1\]"):
        train(train_cfg("learning_check.max_skipped_fraction=1.5", "data.root=/nowhere"))
    with pytest.raises(ConfigError, match="learning_check: .*its key is max_skipped_fraction"):
        train(train_cfg("+learning_check.max_skiped_fraction=0.2", "data.root=/nowhere"))


@pytest.mark.slow
def test_a_training_set_whose_images_are_all_missing_stops_the_run(train_cfg, tmp_path):
    from sapd.data.synthetic import make_synthetic_coco

    synthetic = OmegaConf.to_container(train_cfg().data.synthetic)
    root = make_synthetic_coco(tmp_path / "set", **synthetic)
    for image in (root / "train").glob("*.jpg"):
        image.unlink()
    run = tmp_path / "run"
    cfg = compose_config("train", [*TINY, *SHORT, f"data.root={root}", "data.skip_bad_images=true"], run)
    with pytest.raises(NothingLearnedError) as e:
        train(cfg)
    msg = str(e.value)
    # 3 batches of 4 images, every one of them counted as missing
    assert msg.startswith("no training image was read in 3 step(s)") and "\n" not in msg
    assert "(12 missing; data.skip_bad_images=true)" in msg
    _no_best_checkpoint(run)


def _tiny_box_set(root: Path, num_images: int = 8, side: int = 128) -> Path:
    """A COCO folder whose every box is 2 x 2 px between the pyramid's anchor points (all at multiples
    of 4 px: 4 + 8i on P3, 8 + 16i on P4, ...), in images the tiny run does not resize (128 px)."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(1, num_images + 1):
        Image.new("RGB", (side, side), (40 * i % 255, 120, 200)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": side, "height": side})
        for k in range(4):
            x, y = 4 * (3 + 5 * k) + 1, 4 * (2 + 7 * k) + 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + k % 2, "bbox": [x, y, 2, 2],
                         "area": 4, "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "dot"}, {"id": 2, "name": "speck"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


@pytest.mark.slow
def test_boxes_too_small_for_any_anchor_point_stop_the_run(tmp_path):
    root = _tiny_box_set(tmp_path / "set")
    coco = ["data=coco", f"data.root={root}", "data.train_ann=instances.json", "data.train_images=images",
            "data.val_ann=instances.json", "data.val_images=images", "data.aspect_ratio_groups=0"]  # fmt: skip
    tiny = [o for o in TINY if not o.startswith("data.synthetic.")]
    run = tmp_path / "run"
    cfg = compose_config("train", [*tiny, *coco, *SHORT, "trainer.limit_train_batches=2"], run)
    with pytest.raises(NothingLearnedError) as e:
        train(cfg)
    msg = str(e.value)
    assert msg.startswith("none of the 32 training instances owned an anchor point")
    assert "the largest box is 2.0 px" in msg and "every 8-128 px" in msg and "data.min_size" in msg
    _no_best_checkpoint(run)


@pytest.mark.slow
def test_a_validation_set_whose_images_are_all_missing_stops_the_run(train_cfg, tmp_path):
    from sapd.data.synthetic import make_synthetic_coco

    synthetic = OmegaConf.to_container(train_cfg().data.synthetic)
    root = make_synthetic_coco(tmp_path / "set", **synthetic)
    for image in (root / "val").glob("*.jpg"):
        image.unlink()
    run = tmp_path / "run"
    cfg = compose_config("train", [*TINY, *SHORT, f"data.root={root}", "data.skip_bad_images=true"], run)
    with pytest.raises(NothingLearnedError) as e:  # no table, no best checkpoint to choose: not a success
        train(cfg)
    assert str(e.value).startswith("no val image could be scored: every one evaluated was left out (4 missing")
    _no_best_checkpoint(run)
