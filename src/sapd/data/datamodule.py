"""Lightning data modules: COCO 2017 from a folder, and the embedded synthetic set.

COCO layout under ``root`` (the default file names; each may be overridden)::

    annotations/instances_train2017.json   train2017/
    annotations/instances_val2017.json     val2017/
    annotations/image_info_test-dev2017.json  test2017/     (test_split="test-dev")
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch

from sapd.data import DataError
from sapd.data.annotations import read_annotations
from sapd.data.coco import COCODetection
from sapd.data.data_counts import DataCountsMixin
from sapd.data.loaders import LoadersMixin
from sapd.data.transforms import build_transforms, eval_size

COCO_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
    "test-dev": ("annotations/image_info_test-dev2017.json", "test2017"),
}


class COCODataModule(LoadersMixin, DataCountsMixin, L.LightningDataModule):
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

    The loaders are built by :class:`~sapd.data.loaders.LoadersMixin`; the counts and the skipped
    images are kept by :class:`~sapd.data.data_counts.DataCountsMixin`.
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
        (:func:`~sapd.data.data_counts.format_counts`; a warning when boxes or annotations were
        dropped). A training set left without any training box after filtering is refused: one
        DataError line naming the annotation file and the counts."""
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
        from sapd.data.synthetic import default_root
        from sapd.data.synthetic_drawing import SyntheticParams

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
