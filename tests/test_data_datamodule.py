"""The Lightning data modules and their Hydra configs, on a tiny synthetic set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sapd.data import DataError
from sapd.data.datamodule import COCODataModule, SyntheticCOCODataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
SMALL = {"num_train": 10, "num_val": 5, "min_side": 64, "max_side": 112, "max_objects": 5, "min_object_size": 6}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from sapd.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("syn") / "set", **SMALL)


def _dm(root, **kw):
    args = dict(synthetic=SMALL, batch_size=3, val_batch_size=2, num_workers=0, min_size=[64, 80], max_size=140)
    return SyntheticCOCODataModule(root, **{**args, **kw})


def _check_batch(batch, n, divisor=128):
    images, targets = batch
    assert images.shape[0] == n == len(targets) and images.shape[1] == 3
    assert images.shape[2] % divisor == 0 and images.shape[3] % divisor == 0
    for img_t in targets:
        h, w = img_t["img_size"]
        assert torch.isfinite(images).all()
        assert img_t["boxes"].shape[1] == 4 and img_t["labels"].dtype == torch.long
        if len(img_t["boxes"]):
            assert (img_t["boxes"][:, 2:] <= torch.tensor([w, h]) + 1e-3).all()
            assert img_t["labels"].max() < 8


def test_setup_and_one_batch_each(synthetic_root):
    dm = _dm(synthetic_root)
    assert dm.num_classes == 8 and dm.label_to_cat_id == [1, 3, 4, 7, 10, 13, 18, 21]  # before setup
    assert dm.class_names[0] == "circle"
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 10 and len(dm.val_dataset) == 5
    _check_batch(next(iter(dm.train_dataloader())), 3)
    vimages, vt = next(iter(dm.val_dataloader()))
    _check_batch((vimages, vt), 2)
    assert all(min(t["img_size"]) == 80 or max(t["img_size"]) == 140 for t in vt)  # eval at the max size
    assert all(not t["flipped"] for t in vt) and "eval_boxes" in vt[0]
    dm.setup("test")
    assert len(dm.test_dataset) == 5  # synthetic: test = val


def test_workers_seeded_shuffle_and_limit_val(synthetic_root):
    dm = _dm(synthetic_root, num_workers=2, seed=7, limit_val_images=3, flip_prob=0.0, min_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    ids = [[t["image_id"] for t in targets] for _, targets in loader]
    again = [[t["image_id"] for t in targets] for _, targets in dm.train_dataloader()]
    assert ids == again and sorted(sum(ids, [])) == list(range(1, 11))  # same seed, same order
    assert len(dm.val_dataset) == 3 and len(dm.val_dataset.coco.getImgIds()) == 3
    _check_batch(next(iter(dm.val_dataloader())), 2)
    no_workers = _dm(synthetic_root, persistent_workers=True)
    assert no_workers.persistent_workers is False and no_workers.pin_memory is torch.cuda.is_available()


def test_coco_layout_paths_and_missing_data_error(tmp_path):
    dm = COCODataModule(tmp_path / "coco", num_workers=0)
    assert dm.paths("train") == (tmp_path / "coco/annotations/instances_train2017.json", tmp_path / "coco/train2017")
    assert dm.paths("val") == (tmp_path / "coco/annotations/instances_val2017.json", tmp_path / "coco/val2017")
    assert dm.paths("test") == (tmp_path / "coco/annotations/image_info_test-dev2017.json", tmp_path / "coco/test2017")
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert "instances_train2017.json" in str(e.value) and "cocodataset.org" in str(e.value)
    with pytest.raises(DataError, match="instances_val2017.json"):
        _ = dm.num_classes
    with pytest.raises(DataError, match="test_split"):
        COCODataModule(tmp_path, test_split="test")
    with pytest.raises(DataError, match="before setup"):
        dm.val_dataloader()


def test_hydra_configs_instantiate(synthetic_root, monkeypatch):
    monkeypatch.setenv("COCO_ROOT", "/data/elsewhere/coco")
    coco = instantiate(OmegaConf.load(CONF / "coco.yaml"))
    assert isinstance(coco, COCODataModule) and coco.root == Path("/data/elsewhere/coco")
    assert coco.min_size == 800 and coco.max_size == 1333 and coco.size_divisor == 128 and coco.test_split == "test-dev"
    jitter = instantiate(OmegaConf.merge(OmegaConf.load(CONF / "coco.yaml"), {"min_size": [640, 800]}))
    assert jitter.min_size == [640, 800]

    cfg = OmegaConf.load(CONF / "synthetic.yaml")
    assert cfg.synthetic.num_train == 2000 and cfg.synthetic.num_val == 250  # the embedded default
    assert OmegaConf.to_container(cfg)["cache_dir"] == "${paths.data_dir}"  # no folder of its own
    cfg = OmegaConf.merge(cfg, {"root": str(synthetic_root), "cache_dir": None, "synthetic": SMALL, "num_workers": 0})
    dm = instantiate(cfg)
    assert isinstance(dm, SyntheticCOCODataModule) and dm.root == synthetic_root
    dm.setup("validate")
    assert cfg.size_divisor == 32  # the CPU default pads less than COCO's 128
    _check_batch(next(iter(dm.val_dataloader())), min(cfg.val_batch_size, SMALL["num_val"]), divisor=32)


def test_synthetic_cache_folder_comes_from_the_paths_config(tmp_path, monkeypatch):
    """$SAPD_DATA_DIR is read by conf/paths (paths.data_dir) and reaches the data module as cache_dir."""
    from conftest import compose_config
    from sapd.data.synthetic_drawing import SyntheticParams

    monkeypatch.setenv("SAPD_DATA_DIR", str(tmp_path / "elsewhere"))
    cfg = compose_config("train", ["data.synthetic.num_train=3"], tmp_path)
    assert cfg.data.cache_dir == cfg.paths.data_dir == str(tmp_path / "elsewhere")
    dm = instantiate(cfg.data)  # nothing is drawn before prepare_data
    params = SyntheticParams(**OmegaConf.to_container(cfg.data.synthetic))
    assert dm.root == tmp_path / "elsewhere" / f"synthetic-{params.digest()}"
    explicit = instantiate(cfg.data, root=str(tmp_path / "mine"))
    assert explicit.root == tmp_path / "mine"
    assert not (tmp_path / "elsewhere").exists()


def test_aspect_ratio_grouping_and_distributed_resampling(synthetic_root):
    """Batches hold one orientation; Lightning can swap a DistributedSampler into the batch sampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DistributedSampler

    from sapd.data.samplers import AspectRatioBatchSampler, TrainBatchSampler

    dm = _dm(synthetic_root, aspect_ratio_groups=2, batch_size=2, flip_prob=0.0, seed=1)
    dm.setup("fit")
    landscape = {i: r >= 1 for i, r in zip(dm.train_dataset.ids, dm.train_dataset.aspect_ratios)}
    with _replace_dunder_methods(BatchSampler):  # what the Trainer does around *_dataloader()
        loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, AspectRatioBatchSampler) and len(loader) == 5
    batches = [[t["image_id"] for t in targets] for _, targets in loader]
    assert sorted(sum(batches, [])) == sorted(dm.train_dataset.ids)
    assert sum(len({landscape[i] for i in b}) > 1 for b in batches) <= 1  # only the leftover may mix
    shard = DistributedSampler(dm.train_dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    ddp_loader = _update_dataloader(loader, shard)
    assert isinstance(ddp_loader.batch_sampler, AspectRatioBatchSampler)
    assert ddp_loader.batch_sampler.sampler is shard and len(ddp_loader) == 3  # 5 of 10 images, batches of 2
    assert ddp_loader.batch_sampler.seed == loader.batch_sampler.seed == 1  # the same augmentation seeds
    plain = _dm(synthetic_root, aspect_ratio_groups=0)
    plain.setup("fit")
    one_group = plain.train_dataloader().batch_sampler  # resumable too: plain batches of (index, seed)
    assert isinstance(one_group, TrainBatchSampler) and set(one_group.group_ids.tolist()) == {0}
    assert [len(b) for b in one_group] == [3, 3, 3, 1]  # 10 images, batches of 3, in the sampler's order
    assert type(plain.val_dataloader().batch_sampler) is BatchSampler


def test_evaluation_size_differs_from_training_size(synthetic_root):
    dm = _dm(synthetic_root, min_size=64, max_size=80, val_min_size=96, val_max_size=150)
    dm.setup("fit")
    _, train_t = next(iter(dm.train_dataloader()))
    _, val_t = next(iter(dm.val_dataloader()))
    assert all(max(t["img_size"]) <= 80 for t in train_t)
    assert all(min(t["img_size"]) == 96 or max(t["img_size"]) == 150 for t in val_t)
    assert all(max(t["img_size"]) <= 150 and min(t["img_size"]) <= 96 for t in val_t)


def test_data_counts_and_one_log_line_per_split(synthetic_root, caplog):
    import logging

    from sapd.data.io import SkippedImage

    dm = _dm(synthetic_root)
    with caplog.at_level(logging.INFO, logger="sapd.data.datamodule"):
        dm.setup("fit")
        dm.setup("fit")  # data sets are built once: counted and logged once
    lines = [r.getMessage() for r in caplog.records if r.name == "sapd.data.datamodule"]
    assert len(lines) == 2 and lines[0].startswith("train (") and lines[1].startswith("val (")
    assert "instances_train.json" in lines[0] and "training boxes" in lines[0] and "unknown category" in lines[0]
    counts = dm.data_counts()
    assert set(counts) == {"train", "val"} and counts["train"] == {
        **dm.train_dataset.stats, "skipped_images": 0, "skipped_reasons": {}, "skipped": {}
    }  # fmt: skip
    assert counts["val"]["images"] == 5 and counts["train"]["boxes"] > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sapd.data.datamodule"):
        for _ in range(2):  # two epochs: the same image is logged once, counted in each epoch's total
            dm.record_skipped("train", [SkippedImage(4, "missing", "image file not found: x/4.jpg")])
            dm.end_pass("train")
    assert dm.data_counts()["train"]["skipped"] == {"4": "missing"}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("skipped image id 4 (missing): image file not found: x/4.jpg" in m for m in lines) == 1
    assert sum("train: 1 image(s) skipped (1 missing)" in m for m in lines) == 2
