"""Lightning data modules: COCO 2017 from a folder, and the embedded synthetic set.

COCO layout under ``root`` (the default file names; each may be overridden)::

    annotations/instances_train2017.json   train2017/
    annotations/instances_val2017.json     val2017/
    annotations/image_info_test-dev2017.json  test2017/     (test_split="test-dev")
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

from sapd.data import DataError
from sapd.data.coco import COCODetection, read_annotations
from sapd.data.samplers import (
    AspectRatioBatchSampler,
    EpochRandomSampler,
    InferenceSampler,
    TrainBatchSampler,
    aspect_ratio_groups,
)
from sapd.data.transforms import build_transforms, collate, eval_size

log = logging.getLogger(__name__)

MAX_SKIP_WARNINGS = 10  # skipped images logged one by one, per split; the others are counted
MAX_SKIPPED_LISTED = 100  # skipped image ids (with their reason) in data_counts(), per split


def format_counts(split: str, ann_file: str | Path, stats: Mapping[str, int]) -> str:
    """One line of :attr:`COCODetection.stats <sapd.data.coco.COCODetection>`: what was read and dropped."""
    s = stats
    return (
        f"{split} ({ann_file}): {s['images']} images ({s['no_annotations']} without annotations, "
        f"{s['empty_images']} without a training box, {s['dropped_empty']} of these dropped), "
        f"{s['annotations']} annotations: {s['boxes']} training boxes, {s['crowd']} crowd, "
        f"{s['degenerate_boxes']} degenerate dropped ({s['zero_size_boxes']} with w or h <= 0, also not evaluated; "
        f"{s['outside_boxes']} outside the image; {s['tiny_boxes']} under min_box_size after clipping), "
        f"{s['non_finite_boxes']} with NaN or infinite values dropped, "
        f"{s['unknown_category']} of an unknown category id skipped, "
        f"{s['unknown_image']} of an unknown image id skipped"
    )


class RecordingDataLoader(DataLoader):
    """A ``DataLoader`` that passes each batch's skipped-image records (``targets.skipped``, see
    :func:`~sapd.data.transforms.collate`) to ``on_skipped(split, records)`` in the main process, as
    the batch leaves the loader.

    Reading them there, and not in a Lightning hook, keeps them under every precision: for ``16-true``,
    ``bf16-true`` and ``64-true`` Lightning converts the batch (``convert_input``) before any hook sees
    it, and the conversion rebuilds the target list without them. The batch itself passes unchanged.
    """

    def __init__(self, *args, split: str = "train", on_skipped=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.split, self.on_skipped = split, on_skipped

    def __iter__(self):
        for batch in super().__iter__():
            targets = batch[1] if isinstance(batch, tuple | list) and len(batch) == 2 else None
            skipped = getattr(targets, "skipped", None)
            if skipped and self.on_skipped is not None:
                self.on_skipped(self.split, skipped)
            yield batch


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed
    (which the DataLoader derives from its generator), as PyTorch's reproducibility notes advise."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 -- the legacy global RNG is what third-party code uses
    random.seed(seed)


COCO_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
    "test-dev": ("annotations/image_info_test-dev2017.json", "test2017"),
}


class COCODataModule(L.LightningDataModule):
    """COCO-format detection data for training, validation and test.

    Args:
        root: data folder (``${oc.env:COCO_ROOT,data/coco}`` in ``conf/data/coco.yaml``).
        train_ann / train_images / val_ann / val_images / test_ann / test_images: paths relative to
            ``root`` (or absolute); None -> COCO 2017's names (see module docstring).
        name: a label for titles and logs ("coco", "synthetic").
        test_split: "test-dev" (image info only, no ground truth: a results json for the evaluation
            server) or "val" (test = the val files).
        batch_size / val_batch_size: images per batch for training / for val and test
            (val_batch_size None -> batch_size).
        num_workers, persistent_workers (only used when num_workers > 0), pin_memory (None: on
            when CUDA is available).
        min_size: shorter side for training, an int or [min, max] for scale jitter; evaluation
            uses ``val_min_size`` (None: the max of min_size). max_size caps the longer side,
            ``val_max_size`` at evaluation (None: max_size). Evaluating larger than training is
            a choice of the recipe (see ``conf/data/synthetic.yaml``).
        flip_prob: probability of a horizontal flip in training.
        size_divisor: padded batch sides are multiples of this (128 for P7 at stride 128).
        aspect_ratio_groups: batch images of similar aspect ratio together, so padding wastes less
            (:class:`~sapd.data.samplers.AspectRatioBatchSampler`): 2 = landscape / portrait as in
            detectron2 and MMDetection, k > 2 = k quantile bins, 0 or 1 = off (plain batches).
        drop_empty: drop training images with no box (val / test keep every image).
        skip_bad_images: leave out images that cannot be used (missing, not an image, truncated,
            over PIL's decompression-bomb limit, of another size than annotated) instead of raising
            on the first: their batch is one image short (a batch left empty is skipped by the
            steps), no other image takes their place, and they are left out of evaluation entirely
            (no prediction, and their ground truth is not scored). Each such image is recorded
            here, in the main process, from the batches (``skipped_images``: split -> {image id:
            reason}); the first few are logged one by one, each epoch's total at its end (or at
            teardown), and :meth:`data_counts` reports them. (Recorded by ``on_before_batch_transfer``,
            so with a Trainer that was given this data module; per process under DDP.)
        allow_outside_root: read images whose ``file_name`` is absolute or leads (``..``) out of the
            image folder and ``root`` (False: such a file name is refused in one line).
        limit_val_images: evaluate on the first n val images only (None: all).
        seed: seeds the training shuffle (None: Lightning's / torch's global seed decides).
    """

    def __init__(
        self,
        root: str | Path = "data/coco",
        *,
        name: str = "coco",
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        test_split: str = "test-dev",
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        min_size: int | Sequence[int] = 800,
        val_min_size: int | None = None,
        max_size: int | None = 1333,
        val_max_size: int | None = None,
        flip_prob: float = 0.5,
        size_divisor: int = 128,
        aspect_ratio_groups: int = 2,
        drop_empty: bool = False,
        skip_bad_images: bool = False,
        allow_outside_root: bool = False,
        limit_val_images: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if test_split not in ("val", "test-dev"):
            raise DataError(f"data.test_split must be 'val' or 'test-dev', got {test_split!r}")
        if isinstance(min_size, Sequence) and not isinstance(min_size, str):
            min_size = [int(v) for v in min_size]  # ListConfig -> list
        self.name = str(name)
        self.root = Path(root).expanduser()
        self._paths = {"train": (train_ann, train_images), "val": (val_ann, val_images)}
        self._paths["test"] = (test_ann, test_images) if test_split == "test-dev" else (val_ann, val_images)
        self._default_files = dict(COCO_FILES)
        self._default_files["test"] = COCO_FILES["test-dev" if test_split == "test-dev" else "val"]
        self.test_split = test_split
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.min_size, self.max_size = min_size, max_size
        self.val_min_size = None if val_min_size is None else int(val_min_size)
        self.val_max_size = None if val_max_size is None else int(val_max_size)
        self.flip_prob, self.size_divisor = float(flip_prob), int(size_divisor)
        self.aspect_ratio_groups = int(aspect_ratio_groups)
        self.drop_empty, self.skip_bad_images = bool(drop_empty), bool(skip_bad_images)
        self.allow_outside_root = bool(allow_outside_root)
        self.limit_val_images = None if limit_val_images is None else int(limit_val_images)
        self.seed = seed
        self._train_seed: int | None = None  # the seed in use (see train_seed)
        self._resume: dict[str, int] | None = None  # where a resumed run's training data continues
        self.train_dataset: COCODetection | None = None
        self.val_dataset: COCODetection | None = None
        self.test_dataset: COCODetection | None = None
        self._categories: list[dict] | None = None
        self.skipped_images: dict[str, dict[int | None, str]] = {}  # split -> {image id: reason}
        self._pass_skipped: dict[str, Counter] = {}  # split -> reasons of this pass (epoch) so far
        self._pass_batches: dict[str, int] = {}  # split -> batches of this pass so far

    # -- paths and classes -----------------------------------------------------------------------

    def paths(self, split: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of split "train", "val" or "test"."""
        ann, images = self._paths[split]
        d_ann, d_images = self._default_files[split]
        return self.root / (ann or d_ann), self.root / (images or d_images)

    def _read_categories(self) -> list[dict]:
        """Categories of the val file (smaller than train's), without building the data sets."""
        if self._categories is None:
            self.prepare_data()
            cats = read_annotations(self.paths("val")[0], segmentations=False)["categories"]  # checked
            self._categories = sorted(cats, key=lambda c: c["id"])
        return self._categories

    @property
    def label_to_cat_id(self) -> list[int]:
        """Contiguous label -> COCO category id (available before ``setup``)."""
        ds = self.val_dataset or self.train_dataset
        return ds.label_to_cat_id if ds else [int(c["id"]) for c in self._read_categories()]

    @property
    def class_names(self) -> list[str]:
        ds = self.val_dataset or self.train_dataset
        return ds.class_names if ds else [str(c.get("name", c["id"])) for c in self._read_categories()]

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    # -- Lightning hooks -------------------------------------------------------------------------

    def _dataset(self, split: str, *, train: bool, **kw) -> COCODetection:
        ann, images = self.paths(split)
        min_size, max_size = self.min_size, self.max_size
        if not train:
            min_size, max_size = eval_size(min_size, max_size, self.val_min_size, self.val_max_size)
        tf = build_transforms(train=train, min_size=min_size, max_size=max_size, flip_prob=self.flip_prob)
        return COCODetection(
            ann,
            images,
            transforms=tf,
            skip_bad_images=self.skip_bad_images,
            root=self.root,
            allow_outside_root=self.allow_outside_root,
            **kw,
        )

    def setup(self, stage: str | None = None) -> None:
        """Builds the data sets of ``stage`` (once each), logging one line of counts per split
        (:func:`format_counts`; a warning when boxes or annotations were dropped). A training set
        left without any training box after filtering is refused: one DataError line naming the
        annotation file and the counts."""
        if stage in (None, "fit") and self.train_dataset is None:
            train = self._dataset("train", train=True, drop_empty=self.drop_empty)
            self._log_counts("train", train)
            if train.stats["boxes"] == 0:  # nothing to learn from: refuse rather than train on nothing
                s = train.stats
                raise DataError(
                    f"{train.ann_file}: no training box left after filtering: {s['annotations']} annotations of "
                    f"{s['images'] + s['dropped_empty']} images = {s['crowd']} crowd + {s['degenerate_boxes']} "
                    f"degenerate ({s['zero_size_boxes']} with w or h <= 0, {s['outside_boxes']} outside the image, "
                    f"{s['tiny_boxes']} under min_box_size) + {s['non_finite_boxes']} with NaN or infinite values + "
                    f"{s['unknown_category']} of an unknown category id (and {s['unknown_image']} of no image); "
                    "fix the annotation file (a COCO bbox is [x, y, width, height] in pixels)"
                )
            self.train_dataset = train
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            val = self._dataset("val", train=False, max_images=self.limit_val_images)
            self._log_counts("val", val)
            if len(val) == 0:  # no table to print, no best checkpoint to choose: refuse rather than say nothing
                raise DataError(
                    f"{val.ann_file}: the validation set has no image, so nothing can be scored (training picks its "
                    "best checkpoint by it); give a validation set with images (data.val_ann, data.val_images)"
                )
            self.val_dataset = val
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._dataset("test", train=False)
            self._log_counts("test", self.test_dataset)
        tr, va = self.train_dataset, self.val_dataset
        if tr is not None and va is not None and tr.label_to_cat_id != va.label_to_cat_id:
            raise DataError(
                f"train and val annotation files have different categories: "
                f"{self.train_dataset.label_to_cat_id} vs {self.val_dataset.label_to_cat_id}"
            )

    def _eval_shards(self) -> tuple[int, int] | None:
        """(number of processes, rank) that split validation / test, None outside a distributed run.

        Read from the trainer's strategy (the data-parallel processes Lightning would shard for).
        """
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
            return None
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    # -- counts: what was read, dropped and skipped ---------------------------------------------

    @staticmethod
    def _log_counts(split: str, dataset: COCODetection) -> None:
        """One line per split when its data set is built: a warning when boxes or annotations were dropped."""
        s = dataset.stats
        dropped = s["degenerate_boxes"] or s["unknown_category"] or s["non_finite_boxes"] or s["unknown_image"]
        line = format_counts(split, dataset.ann_file, s)
        if s["unknown_category"]:
            line += f" (ids {sorted(map(str, dataset.unknown_category_ids))[:10]})"
        log.log(logging.WARNING if dropped else logging.INFO, "%s", line)

    def data_counts(self) -> dict[str, dict]:
        """``{"train": {...}, "val": {...}, "test": {...}}`` for the splits built so far: the data
        set's ``stats`` (see :class:`~sapd.data.coco.COCODetection`) plus, from the batches seen in
        this process, ``skipped_images`` (distinct images), ``skipped_reasons`` ({reason: images})
        and ``skipped`` ({image id: reason}, the first 100 by id). Plain ints / strs (json-ready)."""
        out: dict[str, dict] = {}
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset)):
            if dataset is None:
                continue
            skipped = self.skipped_images.get(split, {})
            listed = sorted(skipped.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))[:MAX_SKIPPED_LISTED]
            out[split] = {
                **{k: int(v) for k, v in dataset.stats.items()},
                "skipped_images": len(skipped),
                "skipped_reasons": dict(Counter(skipped.values())),
                "skipped": {str(image_id): reason for image_id, reason in listed},
            }
        return out

    def record_skipped(self, split: str, skipped: Sequence) -> None:
        """Records the :class:`~sapd.data.io.SkippedImage` items a batch of ``split`` dropped; logs each
        image the first time it is skipped, for the first ``MAX_SKIP_WARNINGS`` images of the split."""
        seen = self.skipped_images.setdefault(split, {})
        this_pass = self._pass_skipped.setdefault(split, Counter())
        for item in skipped:
            this_pass[item.reason] += 1
            if item.image_id in seen:
                continue  # skipped again in a later epoch: logged already
            seen[item.image_id] = item.reason
            if len(seen) <= MAX_SKIP_WARNINGS:
                log.warning("%s: skipped image id %s (%s): %s", split, item.image_id, item.reason, item.message)
                if len(seen) == MAX_SKIP_WARNINGS:
                    log.warning("%s: further skipped images are counted, not logged one by one", split)

    def end_pass(self, split: str) -> None:
        """Logs the images skipped in the pass (epoch) over ``split`` that ends, if any, and starts a new one."""
        reasons = self._pass_skipped.pop(split, Counter())
        self._pass_batches.pop(split, None)
        if reasons:
            trainer = self.trainer
            epoch = f"epoch {trainer.current_epoch}, " if trainer is not None else ""
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
            log.warning(
                "%s%s: %d image(s) skipped (%s), not trained on or evaluated (data.skip_bad_images=true); "
                "%d distinct image(s) skipped so far",
                epoch, split, sum(reasons.values()), detail, len(self.skipped_images.get(split, {})),
            )  # fmt: skip

    def _running_split(self) -> str | None:
        trainer = self.trainer
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.sanity_checking or trainer.validating:
            return "val"
        return "test" if trainer.testing else None

    def _pass_length(self, split: str, dataloader_idx: int) -> float:
        """Batches in the current pass over ``split`` (limits included); inf when unknown."""
        trainer = self.trainer
        try:
            if split == "train":
                return trainer.num_training_batches
            if trainer.sanity_checking:
                return trainer.num_sanity_val_batches[dataloader_idx]
            return (trainer.num_val_batches if split == "val" else trainer.num_test_batches)[dataloader_idx]
        except (AttributeError, IndexError, TypeError):
            return math.inf

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Counts the batches of the running pass over a split, to log its skipped images (which
        :class:`RecordingDataLoader` recorded as the batch left the loader) once the pass ends."""
        split = self._running_split()
        if split is None:
            return batch
        self._pass_batches[split] = self._pass_batches.get(split, 0) + 1
        if self._pass_batches[split] >= self._pass_length(split, dataloader_idx):
            self.end_pass(split)
        return batch

    def teardown(self, stage: str) -> None:
        for split in list(self._pass_skipped):  # a pass cut short (max_steps, interruption)
            self.end_pass(split)
        self._pass_batches.clear()
        super().teardown(stage)

    @property
    def train_seed(self) -> int:
        """The seed of the training order and augmentation: ``seed``, else the run's global seed
        (``seed_everything`` sets ``PL_GLOBAL_SEED``), else one drawn once; kept in checkpoints."""
        if self._train_seed is None:
            if self.seed is not None:
                self._train_seed = int(self.seed)
            elif os.environ.get("PL_GLOBAL_SEED", "").lstrip("-").isdigit():
                self._train_seed = int(os.environ["PL_GLOBAL_SEED"])
            else:
                self._train_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return self._train_seed

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the training data's seed and position (the epoch and the batches
        of it already trained on), so that a run resumed from a mid-epoch checkpoint continues with the
        batch an uninterrupted run would train on next; also the images skipped so far."""
        state: dict = {"train_seed": self.train_seed, "skipped_images": copy.deepcopy(self.skipped_images)}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            epoch = trainer.current_epoch
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches stepped this epoch
            if done >= trainer.num_training_batches:  # saved at the epoch's end: the next one starts afresh
                epoch, done = epoch + 1, 0
            state["train_position"] = {"epoch": int(epoch), "batches": int(done)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict` (``ckpt_path=...``): the next training loader starts where it stood."""
        if "train_seed" in state_dict:
            self._train_seed = int(state_dict["train_seed"])
        for split, images in (state_dict.get("skipped_images") or {}).items():
            self.skipped_images.setdefault(split, {}).update(images)
        position = state_dict.get("train_position")
        if position:
            self._resume = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}
            self._pass_batches["train"] = self._resume["batches"]

    def _train_batching(self, dataset: COCODetection, batch_size: int) -> dict:
        """``batch_sampler`` of the training loader: :class:`TrainBatchSampler` over an
        :class:`EpochRandomSampler` (order and augmentation a function of the seed, epoch and index)."""
        resume, self._resume = self._resume or {}, None  # a resumed run's first loader only
        if resume.get("batches"):
            log.info("training data resumes at epoch %d after its first %d batches", resume["epoch"], resume["batches"])
        groups = np.zeros(len(dataset), dtype=np.int64)
        if self.aspect_ratio_groups > 1:
            groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
        sampler = EpochRandomSampler(dataset, self.train_seed, epoch=resume.get("epoch", 0))
        batches = TrainBatchSampler(
            sampler, batch_size, False, groups, self.train_seed, resume.get("epoch"), resume.get("batches", 0)
        )
        return {"batch_sampler": batches}

    def _loader(self, dataset: COCODetection | None, *, train: bool, name: str) -> DataLoader:
        if dataset is None:
            raise DataError(f"{name}_dataloader() called before setup() built the {name} set")
        generator = None
        if train:  # the workers' base seed too (numpy / random in third-party code, seed_worker)
            generator = torch.Generator().manual_seed(self.train_seed)
        batch_size = self.batch_size if train else self.val_batch_size
        shards = None if train else self._eval_shards()
        if train:
            batching = self._train_batching(dataset, batch_size)
        elif shards is not None:
            # validation / test of a distributed run: every process a share of the images, none repeated
            # (Lightning's padding DistributedSampler would score some twice); batches as below, per share
            groups = None
            if self.aspect_ratio_groups > 1:
                groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
            sampler = InferenceSampler(dataset, *shards, group_ids=groups, batch_size=batch_size)
            batching = {"sampler": sampler, "batch_size": batch_size, "drop_last": False}
        elif self.aspect_ratio_groups > 1:
            groups = aspect_ratio_groups(dataset.aspect_ratios, self.aspect_ratio_groups)
            batching = {"batch_sampler": AspectRatioBatchSampler(SequentialSampler(dataset), batch_size, False, groups)}
        else:
            batching = {"batch_size": batch_size, "shuffle": False, "drop_last": False}
        if self.num_workers > 0:
            # the workers are forked and share this process's pages until they write to them; a garbage
            # collection in a worker writes into the header of every object it tracks, and so copies each
            # page holding one: objects frozen here are out of its reach (Python's gc.freeze docs)
            gc.collect()
            gc.freeze()
        return RecordingDataLoader(
            dataset,
            split=name,
            on_skipped=self.record_skipped,
            **batching,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            collate_fn=partial(collate, size_divisor=self.size_divisor),
            worker_init_fn=seed_worker,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True, name="train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False, name="val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False, name="test")


class SyntheticCOCODataModule(COCODataModule):
    """The embedded default: :func:`sapd.data.synthetic.make_synthetic_coco` drawn once in
    ``prepare_data`` (cached; ``root=None`` -> ``<cache_dir>/synthetic-<hash of params>``, where
    ``cache_dir=None`` means ``~/.cache/sapd``; ``conf/data/synthetic.yaml`` passes ``paths.data_dir``),
    then read through the same COCO loader. ``synthetic`` holds the generator's parameters
    (num_train, num_val, seed, min_side, max_side, max_objects, ...). Test = val.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        cache_dir: str | Path | None = None,
        synthetic: Mapping | None = None,
        name: str = "synthetic",
        **kwargs,
    ) -> None:
        from sapd.data.synthetic import SyntheticParams, default_root

        self.synthetic = dict(synthetic or {})
        try:
            params = SyntheticParams(**self.synthetic)
        except TypeError as e:
            raise DataError(f"data.synthetic: {e}") from None
        root = Path(root) if root is not None else default_root(params, cache_dir)
        kwargs.setdefault("test_split", "val")
        for split in ("train", "val"):
            kwargs.setdefault(f"{split}_ann", f"annotations/instances_{split}.json")
            kwargs.setdefault(f"{split}_images", split)
        super().__init__(root, name=name, **kwargs)
        self._prepared = False

    def prepare_data(self) -> None:
        if not self._prepared:
            from sapd.data.synthetic import make_synthetic_coco

            make_synthetic_coco(self.root, verbose=True, **self.synthetic)
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # every rank: a no-op once the cached set exists
        super().setup(stage)
