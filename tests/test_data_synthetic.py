"""The synthetic COCO-format set: determinism, COCO layout, coverage of what COCO exercises."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from sapd.data import DataError
from sapd.data import synthetic as syn
from sapd.data.coco import COCODetection
from sapd.data.synthetic_drawing import VAL_ID_OFFSET, SyntheticParams, rle_encode
from sapd.paths import initialize_configs

TINY = {"num_train": 6, "num_val": 3, "min_side": 64, "max_side": 96, "max_objects": 6, "min_object_size": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = syn.make_synthetic_coco(tmp_path / "a", seed=3, **TINY)
    b = syn.make_synthetic_coco(tmp_path / "b", seed=3, **TINY)
    c = syn.make_synthetic_coco(tmp_path / "c", seed=4, **TINY)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert any(k.endswith(".jpg") for k in fa)
    assert fa["annotations/instances_train.json"] != fc["annotations/instances_train.json"]
    assert fa["train/000000000001.jpg"] != fc["train/000000000001.jpg"]


def test_process_pool_gives_the_same_set(tmp_path):
    params = dict(TINY, num_train=60, num_val=4, min_side=48, max_side=56)  # >= 64 images: pool used
    one = syn.make_synthetic_coco(tmp_path / "one", workers=1, **params)
    two = syn.make_synthetic_coco(tmp_path / "two", workers=2, **params)
    assert _files(one) == _files(two)


def test_coco_layout_and_reuse(tmp_path):
    root = syn.make_synthetic_coco(tmp_path / "s", **TINY)
    for split, n, first in (("train", 6, 1), ("val", 3, VAL_ID_OFFSET + 1)):
        ds = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert [im["id"] for im in ds["images"]] == list(range(first, first + n))
        for im in ds["images"]:
            assert (root / split / im["file_name"]).is_file()
            assert {"id", "file_name", "width", "height"} <= im.keys()
        for a in ds["annotations"]:
            assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"} <= a.keys()
        assert all({"id", "name", "supercategory"} <= c.keys() for c in ds["categories"])
    # a second call with the same parameters reuses the files; other parameters replace the set
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert syn.make_synthetic_coco(tmp_path / "s", **TINY) == root
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    syn.make_synthetic_coco(tmp_path / "s", **dict(TINY, num_train=2))
    assert len(list((root / "train").glob("*.jpg"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left behind


def test_killed_run_leaves_no_half_set(tmp_path, monkeypatch):
    real = syn._write_split

    def dies_after_train(params, split, root, pool):
        if split == "val":
            raise KeyboardInterrupt
        real(params, split, root, pool)

    monkeypatch.setattr(syn, "_write_split", dies_after_train)
    with pytest.raises(KeyboardInterrupt):
        syn.make_synthetic_coco(tmp_path / "s", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="is not a synthetic data set"):
        syn.make_synthetic_coco(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(DataError, match="min_side"):
        syn.make_synthetic_coco(tmp_path / "x", min_side=10)
    with pytest.raises(DataError, match="num_trian"):
        syn.make_synthetic_coco(tmp_path / "x", num_trian=3)


def test_default_root_is_the_cache_folder_and_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("SAPD_DATA_DIR", str(tmp_path / "ignored"))  # the paths config reads it, not Python
    a, b = syn.default_root(SyntheticParams(), tmp_path), syn.default_root(SyntheticParams(seed=1), tmp_path)
    assert a.parent == tmp_path and a.name.startswith("synthetic-") and a != b
    assert syn.default_root(SyntheticParams()) == Path("~/.cache/sapd").expanduser() / a.name
    root = syn.make_synthetic_coco(cache_dir=tmp_path / "cache", **TINY)
    assert root == syn.default_root(SyntheticParams(**TINY), tmp_path / "cache") and root.is_dir()
    assert not (tmp_path / "ignored").exists()


def _synthetic_config(*overrides: str):
    """conf/synthetic.yaml with ``overrides``, as ``python -m sapd.data.synthetic`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("synthetic", overrides=list(overrides))


SMALL_OVERRIDES = [f"data.synthetic.{k}={v}" for k, v in TINY.items()]


def test_cli_draws_the_training_set_and_prints_its_folder(tmp_path, capsys, caplog):
    cfg = _synthetic_config(*SMALL_OVERRIDES)
    # no out=: the folder training reads, under paths.data_dir ($SAPD_DATA_DIR, set by conftest)
    expected = syn.default_root(SyntheticParams(**TINY), os.environ["SAPD_DATA_DIR"])
    assert cfg.data.cache_dir == os.environ["SAPD_DATA_DIR"] and cfg.out is None
    syn.main(cfg)
    assert capsys.readouterr().out.strip() == str(expected)
    assert (expected / "annotations" / "instances_val.json").is_file()
    syn.main(_synthetic_config(f"out={tmp_path / 'cli'}", *SMALL_OVERRIDES))
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "annotations" / "instances_val.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        syn.main(_synthetic_config(f"out={tmp_path / 'bad'}", "data.synthetic.min_side=8"))
    assert exit_info.value.code == 2 and capsys.readouterr().out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "min_side" in errors[0]


def test_rle_encode_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    for first in (False, True):
        m = rng.uniform(size=(13, 17)) < 0.3
        m[0, 0] = first
        rle = mask_utils.frPyObjects(rle_encode(m), 13, 17)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), m)


def test_medium_set_covers_every_pyramid_level_and_coco_quirks(tmp_path):
    # the one medium set: images large enough for objects beyond P7's 256 px scale
    root = syn.make_synthetic_coco(
        tmp_path / "m", num_train=120, num_val=2, min_side=320, max_side=400, crowd_frac=0.2, seed=1
    )
    ds = json.loads((root / "annotations" / "instances_train.json").read_text())
    anns = [a for a in ds["annotations"] if not a["iscrowd"]]
    crowds = [a for a in ds["annotations"] if a["iscrowd"]]
    side = np.array([max(a["bbox"][2:]) for a in anns])
    # one or more instances in each octave from 8 px to 256+ px: P3 (stride 8) ... P7 (stride 128)
    counts, _ = np.histogram(side, [8, 16, 32, 64, 128, 256, 1e9])
    assert (counts > 0).all(), counts
    assert side.min() < 12
    # category ids with gaps, all used
    ids = sorted(c["id"] for c in ds["categories"])
    assert len(ids) >= 6 and ids != list(range(1, len(ids) + 1))
    assert {a["category_id"] for a in anns} == set(ids)
    # empty images and crowd regions with RLE, as COCO has
    with_objects = {a["image_id"] for a in ds["annotations"]}
    assert 0 < len(ds["images"]) - len(with_objects) < 0.2 * len(ds["images"])
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    img = {im["id"]: im for im in ds["images"]}
    for a in crowds:
        h, w = img[a["image_id"]]["height"], img[a["image_id"]]["width"]
        m = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], h, w))
        assert m.sum() == a["area"]
        x, y, bw, bh = a["bbox"]
        assert m[int(y) : int(y + bh), int(x) : int(x + bw)].sum() == m.sum()  # the box holds the mask
    # boxes inside the images, objects with up to 20 per image, many images with overlaps
    for a in anns:
        x, y, bw, bh = a["bbox"]
        im = img[a["image_id"]]
        assert x >= 0 and y >= 0 and x + bw <= im["width"] and y + bh <= im["height"] and min(bw, bh) >= 2
    per_image = np.bincount([a["image_id"] for a in anns])
    assert per_image.max() <= 20
    overlapping = 0  # images where two annotated boxes overlap (occlusion)
    for im_id in np.flatnonzero(per_image >= 2):
        b = torch.tensor([a["bbox"] for a in anns if a["image_id"] == im_id])
        b[:, 2:] += b[:, :2]
        iou = box_iou(b, b).fill_diagonal_(0)
        overlapping += bool((iou > 0.05).any())
    assert overlapping > 0.3 * len(img)
    # read back through the same loader as real COCO
    data = COCODetection(root / "annotations" / "instances_train.json", root / "train")
    assert data.label_to_cat_id == ids and len(data) == 120
    assert data.stats["crowd"] == len(crowds) and data.stats["boxes"] == len(anns)
