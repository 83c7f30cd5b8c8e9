"""COCO-format detection data set (real COCO 2017, test-dev image info, or the synthetic set).

Conventions: boxes are ``x1, y1, x2, y2`` in pixels; COCO's json stores ``x, y, w, h``.
M = training boxes of one image, C = its crowd boxes, G = its evaluation ground truth (what COCOeval
sees: every annotation of a known category except non-crowd ones with w <= 0 or h <= 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sapd.data import COCO_HOWTO, DataError
from sapd.data.io import UNREADABLE, WRONG_SIZE, BadImageError, SkippedImage, read_image

Transform = Callable[[Image.Image, dict], tuple[torch.Tensor, dict]]


def load_coco(ann_file: str | Path):
    """pycocotools ``COCO`` for ``ann_file`` without its chatter on stdout; DataError when the file
    is missing or not COCO json. An image-info-only json (test-dev, no ``annotations``) is fine."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file} -- {COCO_HOWTO}")
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read annotation file {ann_file}: {e}") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(f"{ann_file} is not a COCO annotation file (no 'images' list)")
    if not dataset.get("categories"):
        raise DataError(f"{ann_file} has no 'categories'")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODetection(Dataset):
    """Images and boxes of one COCO annotation file.

    Args:
        ann_file: ``instances_*.json`` (or test-dev's ``image_info_*.json``: no ground truth).
        img_dir: folder of the images named by ``file_name``.
        transforms: ``(PIL RGB image, target) -> (FloatTensor[3, h, w], target)`` updating boxes,
            ``crowd_boxes``, ``img_size``, ``scale_factor``, ``flipped``; None -> normalise only.
        drop_empty: drop images with no training box (after removing crowd and degenerate boxes).
        skip_bad_images: an image that cannot be used (missing, not an image, truncated / corrupt,
            over PIL's decompression-bomb limit, or of another size than its annotation says) gives
            a :class:`~sapd.data.io.SkippedImage` ``(image_id, reason, message)`` instead of an item;
            :func:`~sapd.data.transforms.collate` drops it from its batch and records it in the
            batch's ``targets.skipped`` (counted and logged in the main process by the data
            module). A skipped image is never replaced by another: no image is seen twice, and the
            skipped image is left out of evaluation entirely (nothing predicts it, and its ground
            truth is not scored either). False: the first such image raises a one-line
            ``DataError`` naming the file.
        max_images: keep the first n images only (in json order); ``coco`` is restricted likewise.
        min_box_size: boxes narrower or shorter than this after clipping to the image are dropped.

    Annotations whose ``category_id`` is not in ``categories`` are skipped (neither trained on nor
    evaluated) and counted; non-crowd annotations with w <= 0 or h <= 0 are dropped from training
    and from the evaluation ground truth. ``coco`` keeps the json as read.

    ``stats`` (a plain dict of ints, filled at construction): ``images`` kept, ``annotations`` read
    (of these images), ``boxes`` (training boxes), ``crowd``, ``degenerate_boxes`` (non-crowd boxes
    dropped from training) = ``zero_size_boxes`` (w <= 0 or h <= 0 in the json: also dropped from
    the evaluation ground truth) + ``outside_boxes`` (nothing left after clipping to the image) +
    ``tiny_boxes`` (under ``min_box_size`` after clipping), ``unknown_category`` (annotations
    skipped; their ids in ``unknown_category_ids``), ``no_annotations`` (images without any
    annotation), ``empty_images`` (images without a training box) and ``dropped_empty`` (of these,
    dropped by ``drop_empty``). Skipped images are counted where batches arrive (the data module),
    since DataLoader workers are other processes.

    Item ``(image FloatTensor[3, h, w], target)``; the target holds ``boxes`` FloatTensor[M, 4],
    ``labels`` LongTensor[M] (0..K-1), ``crowd_boxes`` FloatTensor[C, 4] (transformed frame),
    ``image_id``, ``orig_size`` (h, w), ``img_size`` (h, w), ``scale_factor`` (sx, sy), ``flipped``,
    and (unless the json has no ``annotations`` key, as test-dev) in ORIGINAL pixels
    ``eval_boxes`` FloatTensor[G, 4], ``eval_labels`` LongTensor[G],
    ``eval_iscrowd`` BoolTensor[G], ``eval_area`` FloatTensor[G].
    """

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        *,
        transforms: Transform | None = None,
        drop_empty: bool = False,
        skip_bad_images: bool = False,
        max_images: int | None = None,
        min_box_size: float = 1.0,
    ) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        self.coco = load_coco(self.ann_file)
        if not self.img_dir.is_dir():
            raise DataError(f"image folder not found: {self.img_dir} -- {COCO_HOWTO}")
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self._warned_exif = False

        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [int(c["id"]) for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self.has_annotations = "annotations" in self.coco.dataset

        self.stats: dict[str, int] = dict.fromkeys(
            ["images", "annotations", "boxes", "crowd", "degenerate_boxes", "zero_size_boxes", "outside_boxes",
             "tiny_boxes", "unknown_category", "no_annotations", "empty_images", "dropped_empty"], 0
        )  # fmt: skip
        self.unknown_category_ids: set = set()
        self._records: dict[int, dict] = {}
        ids = []
        img_ids = [int(im["id"]) for im in self.coco.dataset["images"]]
        if max_images is not None:
            img_ids = img_ids[: int(max_images)]
        for img_id in img_ids:
            rec = self._parse(img_id, min_box_size)
            if len(rec["boxes"]) == 0:
                self.stats["empty_images"] += 1
                if drop_empty:
                    self.stats["dropped_empty"] += 1
                    continue
            self._records[img_id] = rec
            ids.append(img_id)
        self.ids: list[int] = ids
        self.stats["images"] = len(ids)
        if max_images is not None:
            self.coco = self._restricted_coco(img_ids)

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self, img_id: int, min_box_size: float) -> dict:
        """Per-image arrays, parsed once. A loop over annotations is fine here (json, not hot path)."""
        info = self.coco.imgs[img_id]
        if "width" not in info or "height" not in info or "file_name" not in info:
            raise DataError(f"{self.ann_file}: image id {img_id} lacks file_name / width / height")
        w, h = float(info["width"]), float(info["height"])
        boxes, labels, iscrowd, areas = [], [], [], []
        anns = self.coco.imgToAnns.get(img_id, [])
        self.stats["annotations"] += len(anns)
        self.stats["no_annotations"] += not anns
        for ann in anns:
            cat_id = ann.get("category_id")
            if not isinstance(cat_id, Hashable) or cat_id not in self.cat_id_to_label:
                self.stats["unknown_category"] += 1  # neither trained on nor evaluated
                self.unknown_category_ids.add(cat_id if isinstance(cat_id, Hashable) else repr(cat_id))
                continue
            bbox = ann.get("bbox")
            if not isinstance(bbox, list | tuple) or len(bbox) != 4:
                raise DataError(f"{self.ann_file}: annotation id {ann.get('id')} has no valid bbox: {bbox!r}")
            boxes.append(bbox)
            labels.append(self.cat_id_to_label[cat_id])
            iscrowd.append(bool(ann.get("iscrowd", 0)))
            areas.append(ann.get("area", np.nan))  # missing: w * h, below

        try:
            xywh = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)  # [A, 4], A = annotations kept
            area = np.asarray(areas, dtype=np.float32).reshape(-1)  # [A]
        except (TypeError, ValueError):
            raise DataError(f"{self.ann_file}: non-numeric bbox in the annotations of image id {img_id}") from None
        area = np.where(np.isnan(area), xywh[:, 2] * xywh[:, 3], area)  # [A]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)  # [A, 4], original pixels
        labels_np = np.asarray(labels, dtype=np.int64)
        crowd = np.asarray(iscrowd, dtype=bool)
        clipped = np.clip(xyxy, 0, np.array([w, h, w, h], dtype=np.float32))  # [A, 4]
        extent = clipped[:, 2:] - clipped[:, :2]  # [A, 2]
        sized = (xywh[:, 2:] > 0).all(1)  # [A] w > 0 and h > 0 (False for NaN)
        left = (extent > 0).all(1)  # [A] something is left inside the image
        size_ok = left & (extent >= min_box_size).all(1)  # [A]
        keep = ~crowd & size_ok
        in_eval = crowd | sized  # a non-crowd box without area can never be matched: not ground truth
        self.stats["crowd"] += int(crowd.sum())
        self.stats["degenerate_boxes"] += int((~crowd & ~size_ok).sum())
        self.stats["zero_size_boxes"] += int((~crowd & ~sized).sum())
        self.stats["outside_boxes"] += int((~crowd & sized & ~left).sum())
        self.stats["tiny_boxes"] += int((~crowd & left & ~size_ok).sum())
        self.stats["boxes"] += int(keep.sum())
        return {
            "file_name": info["file_name"],
            "orig_size": (int(info["height"]), int(info["width"])),
            "boxes": clipped[keep],
            "labels": labels_np[keep],
            "crowd_boxes": clipped[crowd],
            "eval_boxes": xyxy[in_eval],
            "eval_labels": labels_np[in_eval],
            "eval_iscrowd": crowd[in_eval],
            "eval_area": area[in_eval],
        }

    def _restricted_coco(self, img_ids: list[int]):
        """A COCO ground truth holding only ``img_ids`` and their annotations."""
        from pycocotools.coco import COCO

        keep = set(img_ids)
        ds = dict(self.coco.dataset)
        ds["images"] = [im for im in ds["images"] if im["id"] in keep]
        if "annotations" in ds:
            ds["annotations"] = [a for a in ds["annotations"] if a["image_id"] in keep]
        coco = COCO()
        coco.dataset = ds
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    # -- access ----------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.ids)

    def ground_truth(self, img_id: int) -> dict[str, np.ndarray]:
        """The evaluation ground truth of image ``img_id``, as evaluation scores it (boxes it drops are not
        in it): ``boxes`` float32[G, 4] (x1, y1, x2, y2, original pixels), ``labels`` int64[G] (contiguous)
        and ``iscrowd`` bool[G]."""
        rec = self._records[img_id]
        return {"boxes": rec["eval_boxes"], "labels": rec["eval_labels"], "iscrowd": rec["eval_iscrowd"]}

    @property
    def aspect_ratios(self) -> list[float]:
        """``width / height`` of every image, from the annotation file (no image is read)."""
        return [self._records[i]["orig_size"][1] / self._records[i]["orig_size"][0] for i in self.ids]

    def _load(self, index: int) -> Image.Image:
        rec = self._records[self.ids[index]]
        path = self.img_dir / rec["file_name"]
        img = read_image(path)
        # the annotations live in the upright frame (detectron2 `check_image_size` does this check);
        # an annotation file made from the stored, unrotated pixels is read in that frame instead
        if (img.height, img.width) == rec["orig_size"][::-1] != rec["orig_size"]:
            raw = read_image(path, exif=False)
            if (raw.height, raw.width) == rec["orig_size"]:
                if not self._warned_exif:
                    self._warned_exif = True
                    warnings.warn(
                        f"{self.ann_file}: sizes of {path} (and maybe others) match the image without its "
                        "EXIF rotation: reading such images unrotated",
                        stacklevel=3,
                    )
                return raw
        if (img.height, img.width) != rec["orig_size"]:
            raise BadImageError(
                f"image {path} is {img.width}x{img.height} after EXIF orientation but its annotation "
                f"says {rec['orig_size'][1]}x{rec['orig_size'][0]}",
                WRONG_SIZE,
            )
        return img

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, dict] | SkippedImage:
        """The item of image ``self.ids[index]``; for an image that cannot be used, a
        :class:`~sapd.data.io.SkippedImage` with ``skip_bad_images``, else a one-line DataError.

        ``index`` may be ``(index, sample_seed)`` (what :class:`~sapd.data.samplers.TrainBatchSampler`
        yields): the random transforms then draw from a generator seeded with ``sample_seed``, so the
        item depends on the data seed, the epoch and the index only (not on the process or on what was
        drawn before), which makes a resumed run see the same augmented images.
        """
        generator = None
        if isinstance(index, tuple):
            index, sample_seed = index
            generator = torch.Generator().manual_seed(int(sample_seed))
        try:
            img = self._load(index)
        except DataError as e:
            reason = getattr(e, "reason", UNREADABLE)
            if self.skip_bad_images:
                return SkippedImage(self.ids[index], reason, str(e))
            raise BadImageError(f"{e} (data.skip_bad_images=true skips such images)", reason) from None
        return self._make_item(index, img, generator)

    def _make_item(
        self, index: int, img: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        img_id = self.ids[index]
        rec = self._records[img_id]
        h, w = rec["orig_size"]
        target = {
            "image_id": img_id,
            "boxes": torch.from_numpy(rec["boxes"].copy()),  # [M, 4]
            "labels": torch.from_numpy(rec["labels"].copy()),  # [M]
            "crowd_boxes": torch.from_numpy(rec["crowd_boxes"].copy()),  # [C, 4]
            "orig_size": (h, w),
            "img_size": (h, w),
            "scale_factor": (1.0, 1.0),
            "flipped": False,
        }
        if self.has_annotations:  # test-dev (image info only) has no ground truth to evaluate
            target |= {
                "eval_boxes": torch.from_numpy(rec["eval_boxes"]),  # [G, 4], original pixels, read-only use
                "eval_labels": torch.from_numpy(rec["eval_labels"]),  # [G]
                "eval_iscrowd": torch.from_numpy(rec["eval_iscrowd"]),  # [G]
                "eval_area": torch.from_numpy(rec["eval_area"]),  # [G]
            }
        if self.transforms is None:
            from sapd.data.transforms import to_normalized_tensor

            return to_normalized_tensor(img), target
        return self.transforms(img, target, generator=generator)
