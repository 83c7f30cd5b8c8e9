"""Bad input, end to end: every refusal explained, nothing lost silently.

Tiny hand-made COCO sets in tmp_path: degenerate boxes, unknown categories, images that cannot be
read (skipped, counted and never replaced), decompression bombs, odd image sizes and bit depths.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from sapd.data import DataError
from sapd.data.coco import COCODetection
from sapd.data.datamodule import COCODataModule
from sapd.data.io import BadImageError, SkippedImage, read_image
from sapd.data.transforms import BatchTargets, build_transforms, collate

CATEGORIES = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path: Path, side: int = 100_000) -> None:
    """A PNG of a few bytes whose header declares side x side pixels (10^10: over PIL's limit)."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b"")
    )


def _ann(i: int, img: int, bbox, cat: int = 1, **kw) -> dict:
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


def _write_set(root: Path, sizes: dict[int, tuple[int, int]], anns: list[dict], name: str = "instances.json"):
    """Images ``{id: (w, h)}`` as ``<id>.png`` in ``root/images`` and their annotation file."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for img_id, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (img_id * 20 % 255, 90, 160)).save(img_dir / f"{img_id}.png")
        images.append({"id": img_id, "file_name": f"{img_id}.png", "width": w, "height": h})
    ann_file = root / name
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return ann_file, img_dir


# -- boxes and annotations -------------------------------------------------------------------------


def test_degenerate_boxes_unknown_categories_and_empty_images_are_counted(tmp_path):
    anns = [
        _ann(1, 1, [2, 2, 10, 10]),  # fine
        _ann(2, 1, [5, 5, 0, 8]),  # zero width
        _ann(3, 1, [5, 5, -4, 8]),  # negative width
        _ann(4, 1, [5, 5, 6, 0]),  # zero height
        _ann(5, 1, [40, 5, 6, 6]),  # wholly past the right border (the image is 32 wide)
        _ann(6, 1, [28, 28, 10, 10]),  # partly past the border: clipped, kept
        _ann(7, 1, [31.5, 3, 4, 4]),  # half a pixel left after clipping: under min_box_size
        _ann(8, 1, [3, 3, 0, 0], iscrowd=1, area=0),  # a crowd region without area: ignored, stays crowd
        _ann(9, 1, [3, 3, 5, 5], cat=7),  # unknown category id
        _ann(10, 2, [1, 1, 4, 4], cat=8),  # unknown category id: image 2 has no training box
    ]
    ds = COCODetection(*_write_set(tmp_path, {1: (32, 32), 2: (16, 16), 3: (16, 16)}, anns))
    s = ds.stats
    assert s["annotations"] == 10 and s["boxes"] == 2 and s["crowd"] == 1
    assert (s["zero_size_boxes"], s["outside_boxes"], s["tiny_boxes"], s["degenerate_boxes"]) == (3, 1, 1, 5)
    assert s["unknown_category"] == 2 and ds.unknown_category_ids == {7, 8}
    assert s["no_annotations"] == 1 and s["empty_images"] == 2  # image 3; images 2 and 3
    _, t = ds[0]
    assert torch.equal(t["boxes"], torch.tensor([[2.0, 2, 12, 12], [28, 28, 32, 32]]))
    # the evaluation ground truth: w <= 0 or h <= 0 and wholly outside (non-crowd) dropped; tiny / crowd kept
    assert t["eval_boxes"].tolist() == [[2, 2, 12, 12], [28, 28, 38, 38], [31.5, 3, 35.5, 7], [3, 3, 3, 3]]
    assert t["eval_iscrowd"].tolist() == [False, False, False, True]
    assert t["eval_area"].tolist() == [100, 100, 16, 0]  # w * h where the json has no area
    assert ds[1][1]["eval_boxes"].shape == (0, 4)  # the unknown category is not ground truth either


def test_all_degenerate_training_set_refuses_at_setup(tmp_path):
    anns = [
        _ann(1, 1, [5, 5, 0, 8]),
        _ann(2, 1, [50, 5, 4, 4]),
        _ann(3, 2, [1, 1, -3, 2]),
        _ann(4, 2, [1, 1, 4, 4], cat=9),
    ]
    ann_file, _ = _write_set(tmp_path, {1: (32, 32), 2: (32, 32)}, anns, name="train.json")
    _write_set(tmp_path, {1: (32, 32)}, [_ann(1, 1, [2, 2, 8, 8])], name="val.json")
    dm = COCODataModule(
        tmp_path, train_ann="train.json", train_images="images", val_ann="val.json", val_images="images", num_workers=0
    )
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ann_file}: no training box left after filtering")
    assert "4 annotations of 2 images" in msg and "3 degenerate (2 with w or h <= 0, 1 outside the image" in msg
    assert "1 of an unknown category id" in msg


# -- images ----------------------------------------------------------------------------------------


def test_16_bit_pngs_are_read(tmp_path):
    Image.fromarray(np.full((5, 7), 0x80FF, np.uint16)).save(tmp_path / "gray16.png")
    rows = b"".join(b"\0" + struct.pack(">9H", *[0xFF00, 0x8000, 0x0100] * 3) for _ in range(2))  # 3 x 2, RGB
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16, 2, 0, 0, 0))
    rgb = _png_chunk(b"IDAT", zlib.compress(rows))
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + rgb + _png_chunk(b"IEND", b""))
    gray = read_image(tmp_path / "gray16.png")
    assert gray.mode == "RGB" and gray.size == (7, 5) and tuple(np.asarray(gray)[2, 3]) == (128, 128, 128)
    colour = read_image(tmp_path / "rgb16.png")
    assert colour.mode == "RGB" and colour.size == (3, 2) and tuple(np.asarray(colour)[1, 2]) == (255, 128, 1)


@pytest.mark.parametrize("train", [True, False])
def test_one_pixel_and_4000x60_images(tmp_path, train):
    anns = [_ann(1, 1, [0, 0, 1, 1]), _ann(2, 2, [100, 10, 3000, 40])]
    data = _write_set(tmp_path, {1: (1, 1), 2: (4000, 60)}, anns)
    tf = build_transforms(train=train, min_size=64, max_size=256, flip_prob=0.0)
    ds, raw = COCODetection(*data, transforms=tf), COCODetection(*data)
    items = [ds[0], ds[1]]
    assert items[0][0].shape == (3, 64, 64) and items[1][0].shape == (3, 4, 256)  # 1 x 1 up, 4000 x 60 capped
    for (_, t), (_, r) in zip(items, [raw[0], raw[1]]):
        sx, sy = t["scale_factor"]
        assert torch.allclose(t["boxes"] / torch.tensor([sx, sy, sx, sy]), r["boxes"], atol=1e-3)
    images, targets = collate(items, size_divisor=128)
    assert images.shape == (2, 3, 128, 256) and len(targets) == 2 and torch.isfinite(images).all()


def test_decompression_bomb_is_skipped_by_the_data_set_or_named_by_it(tmp_path):
    ann_file, img_dir = _write_set(tmp_path, {1: (16, 16), 2: (16, 16)}, [_ann(1, 1, [1, 1, 5, 5])])
    _bomb(img_dir / "2.png")
    with pytest.raises(DataError) as e:
        COCODetection(ann_file, img_dir)[1]
    msg = str(e.value)
    assert "2.png is too large to decode: 10,000,000,000 pixels" in msg and "PIL.Image.MAX_IMAGE_PIXELS" in msg
    assert "data.skip_bad_images=true skips such images" in msg and "\n" not in msg
    marker = COCODetection(ann_file, img_dir, skip_bad_images=True)[1]
    assert isinstance(marker, SkippedImage) and marker[:2] == (2, "too_large")


def test_predict_reader_path_counts_a_decompression_bomb_and_goes_on(tmp_path, monkeypatch, caplog):
    from sapd import predict as predict_module
    from sapd.api import to_pil

    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (20, 10), (9, 9, 9)).save(images / "a.png")
    _bomb(images / "b.png")
    with pytest.raises(BadImageError, match=r"b\.png is too large to decode: 10,000,000,000 pixels"):
        to_pil(images / "b.png")

    class Stub:  # the detector: the test is about reading, not detecting
        score_thresh = 0.5

        def stream(self, images, batch_size):
            for i, _image in enumerate(images):
                yield i, type("Result", (), {"to_records": lambda self: []})()

        def draw(self, image, result):
            return image

    monkeypatch.setattr(predict_module.Detector, "from_checkpoint", staticmethod(lambda *a, **k: Stub()))
    cfg = OmegaConf.create({"input": str(images), "output": str(tmp_path / "out"), "ckpt_path": "x.ckpt"})
    with caplog.at_level(logging.INFO, logger="sapd.predict"):
        summary = predict_module.predict(cfg)
    assert summary["written"] == 1 and [Path(f).name for f in summary["failed"]] == ["b.png"]
    assert "1 unreadable image(s) skipped: b.png" in caplog.text and "too large to decode" in caplog.text


# -- skipped images through a Trainer: counted in the main process, never replaced -----------------


class _Probe(L.LightningModule):
    """Records the image ids each step sees; skips empty batches as SAPDLitModule does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list[int]] = {"train": [], "val": []}
        self.empty = {"train": 0, "val": 0}

    def training_step(self, batch, batch_idx):
        images, targets = batch
        if images.shape[0] == 0:
            self.empty["train"] += 1
            return None
        self.seen["train"] += [int(t["image_id"]) for t in targets]
        return (self.w - images.mean()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.empty["val"] += images.shape[0] == 0
        self.seen["val"] += [int(t["image_id"]) for t in targets]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# *-true precisions: Lightning converts the batch (rebuilding the target list) before any hook sees it
@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "64-true"])
def test_skipped_images_are_counted_in_the_main_process_from_worker_batches(tmp_path, caplog, precision):
    sizes = {i: (24, 16) for i in range(1, 6)}
    ann_file, img_dir = _write_set(tmp_path, sizes, [_ann(i, i, [2, 2, 8, 8]) for i in sizes])
    (img_dir / "3.png").unlink()
    (img_dir / "4.png").write_text("not an image")
    dm = COCODataModule(
        tmp_path, train_ann=ann_file.name, train_images="images", val_ann=ann_file.name, val_images="images",
        batch_size=1, val_batch_size=2, num_workers=2, persistent_workers=False, aspect_ratio_groups=0,
        min_size=16, max_size=32, skip_bad_images=True, seed=0,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, precision=precision,
    )  # fmt: skip
    probe = _Probe()
    with caplog.at_level(logging.INFO, logger="sapd.data.datamodule"):
        trainer.fit(probe, datamodule=dm)
    # never replaced: each good image once per epoch, the bad ones never; val's [3, 4] batch is empty
    assert sorted(probe.seen["train"]) == [1, 1, 2, 2, 5, 5] and probe.empty["train"] == 4
    assert probe.seen["val"] == [1, 2, 5, 1, 2, 5] and probe.empty["val"] == 2
    expected = {3: "missing", 4: "unreadable"}
    assert dm.skipped_images == {"train": expected, "val": expected}  # read from worker batches
    counts = dm.data_counts()
    assert counts["train"]["skipped_images"] == 2 and counts["val"]["skipped"] == {"3": "missing", "4": "unreadable"}
    assert counts["val"]["skipped_reasons"] == {"missing": 1, "unreadable": 1} and counts["val"]["images"] == 5
    json.dumps(counts)  # plain data
    lines = [r.getMessage() for r in caplog.records if r.name == "sapd.data.datamodule"]
    per_image = [m for m in lines if "skipped image id" in m]
    assert len(per_image) == 4 and any("3.png" in m and "(missing)" in m for m in per_image)  # once per image
    for epoch in (0, 1):
        for split in ("train", "val"):
            assert f"epoch {epoch}, {split}: 2 image(s) skipped (1 missing, 1 unreadable)" in "\n".join(lines)


def test_sapd_module_steps_skip_a_batch_without_images():
    from sapd.module import SAPDLitModule

    module = SAPDLitModule(net=nn.Identity())  # any use of the network would fail
    empty = collate([SkippedImage(3, "missing", "image file not found: 3.png")], size_divisor=32)
    assert empty[0].shape == (0, 3, 32, 32) and isinstance(empty[1], BatchTargets) and len(empty[1]) == 0
    assert module.training_step(empty, 0) is None
    assert module.validation_step(empty, 0) is None and module.test_step(empty, 0) is None


@pytest.mark.slow
def test_training_run_summary_holds_the_data_counts(tmp_path):
    """A real (tiny) training run with one unreadable train image and one missing val image."""
    from conftest import TINY, compose_config
    from sapd.data.synthetic import make_synthetic_coco
    from sapd.train import train

    cfg = compose_config("train", [*TINY, "trainer.max_epochs=1", "validate_best=false"], tmp_path / "run")
    synthetic = OmegaConf.to_container(cfg.data.synthetic)
    root = make_synthetic_coco(tmp_path / "set", **synthetic)
    val_first = sorted((root / "val").glob("*.jpg"))[0]
    val_first.unlink()
    sorted((root / "train").glob("*.jpg"))[0].write_bytes(b"\xff\xd8 truncated")
    cfg = compose_config(
        "train",
        [*TINY, "trainer.max_epochs=1", "validate_best=false", f"data.root={root}", "data.skip_bad_images=true"],
        tmp_path / "run",
    )
    train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counts = summary["data_counts"]
    assert counts["train"]["skipped_images"] == 1 and counts["train"]["skipped_reasons"] == {"unreadable": 1}
    assert counts["val"]["skipped_images"] == 1 and counts["val"]["skipped_reasons"] == {"missing": 1}
    assert counts["train"]["images"] == synthetic["num_train"] and counts["train"]["degenerate_boxes"] >= 0
    # every training instance of the epoch was seen once (one image was skipped)
    instances = summary["instance_counts"]
    assert 0 < instances["instances"] < counts["train"]["boxes"]
    assert 0 <= instances["without_anchor_point"] <= instances["instances"]
    assert summary["phase_switch_epoch"] == 0  # half of 1 epoch
    assert summary["device"] == {"type": "cpu"}  # trainer=cpu; on CUDA also the GPU's name and peak memory
    # what sapd.report pairs and pools runs by: the data (its root and generator) and the commit
    assert summary["data"]["root"] == str(root) and summary["data"]["synthetic"] == synthetic
    assert summary["commit"] is None or set(summary["commit"]) == {"sha", "dirty"}
