"""COCO-format detection data set (real COCO 2017, test-dev image info, or the synthetic set).

Conventions: boxes are ``x1, y1, x2, y2`` in pixels; COCO's json stores ``x, y, w, h``.
M = training boxes of one image, C = its crowd boxes, G = its evaluation ground truth (what COCOeval
sees: every annotation of a known category with finite numbers, except non-crowd ones with w <= 0
or h <= 0 or wholly outside the image).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import io
import itertools
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sapd.data import COCO_HOWTO, DataError
from sapd.data.io import UNREADABLE, WRONG_SIZE, BadImageError, SkippedImage, read_image_oriented
from sapd.data.transforms import EXIF_INVERSE, orient_boxes

Transform = Callable[[Image.Image, dict], tuple[torch.Tensor, dict]]


def _drop_segmentation(obj: dict) -> dict:
    """``json.load`` object hook: every object loses its ``segmentation`` as soon as it is built, so
    the polygons and crowd RLEs of a large file are never all held at once."""
    obj.pop("segmentation", None)
    return obj


def read_annotations(ann_file: str | Path, *, segmentations: bool = True) -> dict:
    """The annotation file ``ann_file`` as a dict, checked (:func:`check_annotations`); without the
    annotations' ``segmentation`` unless ``segmentations`` (bounding-box training and evaluation do
    not use them). DataError when the file is missing, is not json or is not COCO json. An
    image-info-only json (test-dev, no ``annotations``) is fine."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file} -- {COCO_HOWTO}")
    try:
        with open(ann_file) as f:
            dataset = json.load(f, object_hook=None if segmentations else _drop_segmentation)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read annotation file {ann_file}: {e}") from None
    check_annotations(dataset, ann_file)
    return dataset


def _is_int(value) -> bool:
    return type(value) is int  # bool is not an id


def check_annotations(dataset, ann_file: str | Path) -> None:
    """Refuses, in one line naming ``ann_file``, the entry and what to do, an annotation file that
    would mix data up or fail later: not an object with an ``images`` list and a ``categories``
    list; ``annotations`` that is not a list (of objects); an image without an integer ``id``, a
    ``file_name`` or positive whole ``width`` / ``height``; a repeated image id or category id."""
    fix = "fix the annotation file (COCO format: https://cocodataset.org/#format-data)"
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(f"{ann_file} is not a COCO annotation file (no 'images' list)")
    cats = dataset.get("categories")
    if not cats:
        raise DataError(f"{ann_file} has no 'categories'")
    if not isinstance(cats, list) or not all(isinstance(c, dict) and _is_int(c.get("id")) for c in cats):
        raise DataError(f"{ann_file}: 'categories' must be a list of objects with an integer 'id'; {fix}")
    cat_ids = [c["id"] for c in cats]
    if len(set(cat_ids)) != len(cat_ids):
        dup = next(i for i, n in Counter(cat_ids).items() if n > 1)
        names = [str(c.get("name")) for c in cats if c["id"] == dup]
        raise DataError(
            f"{ann_file}: category id {dup} is given to {len(names)} categories ({', '.join(names)}); "
            f"each category needs its own id, or their boxes would be trained as one class: {fix}"
        )
    anns = dataset.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"{ann_file}: 'annotations' is a {type(anns).__name__}, not a list of annotations; {fix}")
    if not all(type(a) is dict for a in anns):
        k = next(k for k, a in enumerate(anns) if type(a) is not dict)
        raise DataError(f"{ann_file}: annotations[{k}] is a {type(anns[k]).__name__}, not an object; {fix}")
    seen: set[int] = set()
    for k, im in enumerate(dataset["images"]):
        if type(im) is not dict:
            raise DataError(f"{ann_file}: images[{k}] is a {type(im).__name__}, not an object; {fix}")
        img_id = im.get("id")
        if not _is_int(img_id):
            what = "has no 'id'" if img_id is None else f"has id {img_id!r}, a {type(img_id).__name__}"
            raise DataError(f"{ann_file}: images[{k}] ({im.get('file_name')!r}) {what}; image ids are integers: {fix}")
        if img_id in seen:
            raise DataError(
                f"{ann_file}: image id {img_id} is given to more than one image (images[{k}], {im.get('file_name')!r}, "
                f"is one of them); each image needs its own id, or one image's boxes would be paired with another's "
                f"file: {fix}"
            )
        seen.add(img_id)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise DataError(f"{ann_file}: image id {img_id} has no 'file_name'; {fix}")
        for key in ("width", "height"):
            v = im.get(key)
            if type(v) not in (int, float) or not math.isfinite(v) or v != int(v) or v <= 0:
                raise DataError(
                    f"{ann_file}: image id {img_id} ({im['file_name']}) has {key} {v!r}; width and height must be "
                    f"the image's size in pixels (whole numbers > 0): {fix}"
                )


def load_coco(ann_file: str | Path, image_ids: Collection[int] | None = None):
    """pycocotools ``COCO`` of ``ann_file`` (checked, segmentations included) without its chatter on
    stdout, restricted to ``image_ids`` and their annotations when given."""
    from pycocotools.coco import COCO

    dataset = read_annotations(ann_file)
    if image_ids is not None:
        keep = set(image_ids)
        dataset["images"] = [im for im in dataset["images"] if im["id"] in keep]
        if "annotations" in dataset:
            dataset["annotations"] = [a for a in dataset["annotations"] if a.get("image_id") in keep]
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _return_freed_memory() -> None:
    """Hands the memory the parsed json held back to the operating system (glibc keeps freed heap
    pages otherwise: on a COCO-sized file ~130 MB more RSS, which forked loader workers inherit)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps them
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _csr(rows: np.ndarray, n: int, *arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of ``arrays`` grouped by image: ``offsets`` [n + 1] and each array sorted by ``rows``
    (stable, so json order within an image), image i's entries at ``offsets[i]:offsets[i + 1]``."""
    order = np.argsort(rows, kind="stable")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets, [np.ascontiguousarray(a[order]) for a in arrays]


def _outside(name: str, img_dir: Path, folders: Sequence[Path]) -> bool:
    """True when ``name`` (a json ``file_name``, read in ``img_dir``) is absolute or leads out of every
    one of ``folders`` (read lexically: ``..`` steps count; links are followed as the user made them)."""
    if os.path.isabs(name):
        return True
    if ".." not in name:  # nothing leads up: inside img_dir (the fast path of nearly every file)
        return False
    path = os.path.normpath(os.path.join(os.path.abspath(img_dir), name))
    return not any(path.startswith(os.path.abspath(f).rstrip(os.sep) + os.sep) for f in folders)


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
        root: the data root; with ``img_dir`` the folders a ``file_name`` may lead into.
        allow_outside_root: False: a ``file_name`` that is absolute or leads (``..``) out of
            ``img_dir`` and ``root`` is refused in one line (``data.allow_outside_root=true`` allows it).

    The annotation file is checked first (:func:`check_annotations`: repeated image or category
    ids, images without an integer id or a positive size, ``annotations`` not a list are refused in
    one line). Then each annotation is read:

    - ``bbox`` must be 4 numbers (json ``true`` / ``false`` and strings are refused in one line, as
      is ``iscrowd`` other than 0, 1, true or false); a box with a NaN or infinite value is dropped
      from training and from the evaluation ground truth and counted (``non_finite_boxes``);
    - an annotation whose ``image_id`` names no image is skipped and counted (``unknown_image``),
      one whose ``category_id`` is not in ``categories`` likewise (``unknown_category``: neither
      trained on nor evaluated);
    - non-crowd boxes with w <= 0 or h <= 0, or wholly outside the image, are dropped from training
      and from the evaluation ground truth (COCOeval could never match them); boxes under
      ``min_box_size`` after clipping are dropped from training only (they are real, small objects);
    - ``area`` (the evaluation's size range) is w * h where it is missing or not a finite number >= 0.

    What is kept is held in numpy arrays (a few bytes a box, no Python object per annotation): the
    parsed json, segmentations and every key training and evaluation do not use are dropped after
    parsing, so that forked DataLoader workers share the arrays instead of copying them page by page
    as reference counts change. :attr:`coco` (pycocotools, segmentations included) re-reads the file
    when something asks for it.

    ``stats`` (a plain dict of ints, filled at construction): ``images`` kept, ``annotations`` read
    (of these images), ``boxes`` (training boxes), ``crowd``, ``degenerate_boxes`` (non-crowd boxes
    dropped from training) = ``zero_size_boxes`` (w <= 0 or h <= 0 in the json) + ``outside_boxes``
    (nothing left after clipping to the image; these two are not evaluated either) + ``tiny_boxes``
    (under ``min_box_size`` after clipping), ``non_finite_boxes`` (NaN or infinite: dropped, crowd or
    not), ``unknown_category`` (annotations skipped; their ids in ``unknown_category_ids``),
    ``unknown_image`` (annotations skipped: their image id names no image of the file),
    ``no_annotations`` (images without any annotation), ``empty_images`` (images without a training
    box) and ``dropped_empty`` (of these, dropped by ``drop_empty``). Skipped images are counted
    where batches arrive (the data module), since DataLoader workers are other processes.

    Images are read upright (their EXIF orientation applied), as predict and the API read them.
    An image whose annotated width and height are those of its stored pixels, turned a quarter by
    its EXIF orientation (tags 5-8, not square), is taken as annotated on the stored pixels: its
    boxes are turned with the image, and its target's ``exif_turn`` holds the tag, so that results
    can be turned back into the annotation file's frame (:meth:`to_annotation_frame`).

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
        root: str | Path | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        dataset = read_annotations(self.ann_file, segmentations=False)
        if not self.img_dir.is_dir():
            raise DataError(f"image folder not found: {self.img_dir} -- {COCO_HOWTO}")
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self._warned_exif = False

        cats = sorted(dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [int(c["id"]) for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self.has_annotations = "annotations" in dataset

        self.stats: dict[str, int] = dict.fromkeys(
            ["images", "annotations", "boxes", "crowd", "degenerate_boxes", "zero_size_boxes", "outside_boxes",
             "tiny_boxes", "non_finite_boxes", "unknown_category", "unknown_image", "no_annotations",
             "empty_images", "dropped_empty"], 0
        )  # fmt: skip
        self.unknown_category_ids: set = set()
        images = dataset["images"][: None if max_images is None else int(max_images)]
        self._image_ids = np.array([im["id"] for im in images], dtype=np.int64)  # [N] rows
        self._check_file_names(images, root, allow_outside_root)
        names = [im["file_name"].encode() for im in images]
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)  # every file name, utf-8, one buffer
        self._name_offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in names], out=self._name_offsets[1:])
        self._sizes = np.array([(im["height"], im["width"]) for im in images], dtype=np.int64).reshape(-1, 2)
        all_ids = {im["id"] for im in dataset["images"]}
        self._parse(dataset.get("annotations", []), all_ids, min_box_size)
        del dataset, images, names  # the json is not needed any more: only the arrays stay
        _return_freed_memory()

        train_count = np.diff(self._offsets["train"])  # [N] training boxes per image
        empty = train_count == 0
        self.stats["empty_images"] = int(empty.sum())
        keep = ~empty if drop_empty else np.ones(len(empty), dtype=bool)
        self.stats["dropped_empty"] = int((~keep).sum())
        self._rows = np.flatnonzero(keep)  # [len(self)] row of each item
        self.ids: list[int] = self._image_ids[self._rows].tolist()
        self.stats["images"] = len(self.ids)
        self._coco_ids = None if max_images is None else self._image_ids.tolist()
        self._coco = None
        self._row_of: dict[int, int] | None = None  # image id -> row, for ground_truth()

    # -- parsing ---------------------------------------------------------------------------------

    def _check_file_names(self, images: list[dict], root, allow_outside_root: bool) -> None:
        if allow_outside_root:
            return
        folders = [self.img_dir] + ([Path(root)] if root is not None else [])
        for im in images:
            if _outside(im["file_name"], self.img_dir, folders):
                folders_named = " and ".join(str(f) for f in folders)
                raise DataError(
                    f"{self.ann_file}: image id {im['id']} has file_name {im['file_name']!r}, which leads out of "
                    f"{folders_named}; fix the annotation file, or set data.allow_outside_root=true to read images "
                    "from anywhere"
                )

    def _refuse(self, ann: dict, what: str) -> None:
        raise DataError(
            f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')}) {what}; "
            "fix the annotation file (a COCO bbox is [x, y, width, height] in pixels, iscrowd 0 or 1)"
        )

    def _parse(self, anns: list[dict], all_ids: set[int], min_box_size: float) -> None:
        """Every annotation of the kept images into per-image arrays (:func:`_csr`), with the counts.

        One Python pass over the annotations reads the json's values (this is json, not the hot path);
        the box arithmetic is vectorised over all of them.
        """
        n = len(self._image_ids)
        row_of = {int(i): r for r, i in enumerate(self._image_ids.tolist())}
        rows, labels, bboxes, crowds, areas, kept = [], [], [], [], [], []
        any_rows = []  # the image of every annotation of the kept images, any category
        for ann in anns:
            image_id = ann.get("image_id")
            row = row_of.get(image_id) if type(image_id) is int else None
            if row is None:
                if not (type(image_id) is int and image_id in all_ids):  # else: an image past max_images
                    self.stats["unknown_image"] += 1
                continue
            any_rows.append(row)
            cat_id = ann.get("category_id")
            label = self.cat_id_to_label.get(cat_id) if type(cat_id) is int else None
            if label is None:
                self.stats["unknown_category"] += 1  # neither trained on nor evaluated
                self.unknown_category_ids.add(cat_id if isinstance(cat_id, Hashable) else repr(cat_id))
                continue
            rows.append(row)
            labels.append(label)
            bboxes.append(ann.get("bbox"))
            crowds.append(ann.get("iscrowd", 0))
            areas.append(ann.get("area"))
            kept.append(ann)
        per_image = np.bincount(np.array(any_rows, dtype=np.int64), minlength=n)  # [N] annotations of each image
        self.stats["annotations"] = len(any_rows)
        self.stats["no_annotations"] = int((per_image == 0).sum())

        # the values' types, checked in C over all of them; a slow pass only to name an offender
        if not set(map(type, bboxes)) <= {list} or not set(map(len, bboxes)) <= {4}:
            k = next(k for k, b in enumerate(bboxes) if type(b) is not list or len(b) != 4)
            self._refuse(kept[k], f"has no valid bbox: {bboxes[k]!r}")
        if not set(map(type, itertools.chain.from_iterable(bboxes))) <= {int, float}:
            k = next(k for k, b in enumerate(bboxes) if not all(type(v) in (int, float) for v in b))
            self._refuse(kept[k], f"has a non-numeric bbox {bboxes[k]!r} (numbers only, not strings or true / false)")
        bad = [k for k, c in enumerate(crowds) if type(c) not in (int, bool) or c not in (0, 1)]
        if bad:
            self._refuse(kept[bad[0]], f"has iscrowd {crowds[bad[0]]!r} (0, 1, true or false only)")
        del kept

        xywh = np.array(bboxes, dtype=np.float64).reshape(-1, 4)  # [A, 4], A = annotations kept
        area = np.array([a if type(a) in (int, float) else np.nan for a in areas], dtype=np.float64)  # [A]
        rows_np = np.array(rows, dtype=np.int64)
        labels_np = np.array(labels, dtype=np.int64)
        crowd = np.array(crowds, dtype=bool)
        del bboxes, areas, rows, labels, crowds
        finite = np.isfinite(xywh).all(1)  # [A]
        xywh[~finite] = 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            area = np.where(np.isfinite(area) & (area >= 0), area, xywh[:, 2] * xywh[:, 3])  # [A]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)  # [A, 4], original pixels
        hw = self._sizes[rows_np].astype(np.float64)  # [A, 2] (h, w) of each annotation's image
        limit = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)  # [A, 4]
        clipped = np.clip(xyxy, 0, limit)  # [A, 4]
        extent = clipped[:, 2:] - clipped[:, :2]  # [A, 2]
        sized = (xywh[:, 2:] > 0).all(1) & finite  # [A] w > 0 and h > 0
        left = (extent > 0).all(1) & sized  # [A] something of it is inside the image
        size_ok = left & (extent >= min_box_size).all(1)  # [A]
        plain = ~crowd & finite  # [A] non-crowd boxes with numbers
        keep = plain & size_ok  # training boxes
        crowd_ok = crowd & finite
        in_eval = crowd_ok | (plain & left)  # a box COCOeval could never match is not ground truth
        s = self.stats
        s["non_finite_boxes"] = int((~finite).sum())
        s["crowd"] = int(crowd_ok.sum())
        s["degenerate_boxes"] = int((plain & ~size_ok).sum())
        s["zero_size_boxes"] = int((plain & ~sized).sum())
        s["outside_boxes"] = int((plain & sized & ~left).sum())
        s["tiny_boxes"] = int((plain & left & ~size_ok).sum())
        s["boxes"] = int(keep.sum())

        f32 = np.float32
        self._offsets: dict[str, np.ndarray] = {}
        self._offsets["train"], (self._train_boxes, self._train_labels) = _csr(
            rows_np[keep], n, clipped[keep].astype(f32), labels_np[keep]
        )
        self._offsets["crowd"], (self._crowd_boxes,) = _csr(rows_np[crowd_ok], n, clipped[crowd_ok].astype(f32))
        ev = in_eval
        self._offsets["eval"], (self._eval_boxes, self._eval_labels, self._eval_iscrowd, self._eval_area) = _csr(
            rows_np[ev], n, xyxy[ev].astype(f32), labels_np[ev], crowd[ev], area[ev].astype(f32)
        )

    # -- access ----------------------------------------------------------------------------------

    @property
    def coco(self):
        """pycocotools ``COCO`` of the annotation file as written (segmentations included; restricted
        to the first ``max_images`` images when that was given), read on first use."""
        if self._coco is None:
            self._coco = load_coco(self.ann_file, self._coco_ids)
        return self._coco

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.ids)

    def ground_truth(self, img_id: int) -> dict[str, np.ndarray]:
        """The evaluation ground truth of image ``img_id``, as evaluation scores it (boxes it drops are not
        in it): ``boxes`` float32[G, 4] (x1, y1, x2, y2, original pixels), ``labels`` int64[G] (contiguous)
        and ``iscrowd`` bool[G]; in the annotation file's frame."""
        if self._row_of is None:  # built on first use only (not in every loader worker)
            self._row_of = {int(i): r for r, i in enumerate(self._image_ids.tolist())}
        ev = self._entries("eval", self._row_of[int(img_id)])
        return {"boxes": self._eval_boxes[ev], "labels": self._eval_labels[ev], "iscrowd": self._eval_iscrowd[ev]}

    @property
    def aspect_ratios(self) -> list[float]:
        """``width / height`` of every image, from the annotation file (no image is read)."""
        hw = self._sizes[self._rows]  # [len(self), 2]
        return (hw[:, 1] / hw[:, 0]).tolist()

    def file_name(self, index: int) -> str:
        """The json ``file_name`` of item ``index``."""
        row = self._rows[index]
        return self._names[self._name_offsets[row] : self._name_offsets[row + 1]].tobytes().decode()

    def _entries(self, kind: str, row: int) -> slice:
        offsets = self._offsets[kind]
        return slice(int(offsets[row]), int(offsets[row + 1]))

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image of item ``index``, upright, and the EXIF tag by which its annotation's boxes are to
        be turned (1: none; 5-8: annotated on the stored pixels of a quarter-turned photo)."""
        h, w = (int(v) for v in self._sizes[self._rows[index]])
        path = self.img_dir / self.file_name(index)
        img, orientation = read_image_oriented(path)
        if (img.height, img.width) == (h, w):
            return img, 1
        if orientation >= 5 and (img.width, img.height) == (h, w):
            if not self._warned_exif:
                self._warned_exif = True
                warnings.warn(
                    f"{self.ann_file}: width and height of {path} (and maybe others) are those of its pixels as "
                    "stored, before their EXIF rotation: its boxes are turned with the image",
                    stacklevel=3,
                )
            return img, orientation
        raise BadImageError(
            f"image {path} is {img.width}x{img.height} after EXIF orientation but its annotation says {w}x{h}",
            WRONG_SIZE,
        )

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
            img, turn = self._load(index)
        except DataError as e:
            reason = getattr(e, "reason", UNREADABLE)
            if self.skip_bad_images:
                return SkippedImage(self.ids[index], reason, str(e))
            raise BadImageError(f"{e} (data.skip_bad_images=true skips such images)", reason) from None
        return self._make_item(index, img, generator, turn)

    def _make_item(
        self, index: int, img: Image.Image, generator: torch.Generator | None = None, turn: int = 1
    ) -> tuple[torch.Tensor, dict]:
        row = int(self._rows[index])
        h, w = (int(v) for v in self._sizes[row])  # as annotated
        train, crowd, ev = (self._entries(kind, row) for kind in ("train", "crowd", "eval"))
        target = {
            "image_id": self.ids[index],
            "boxes": torch.from_numpy(self._train_boxes[train].copy()),  # [M, 4]
            "labels": torch.from_numpy(self._train_labels[train].copy()),  # [M]
            "crowd_boxes": torch.from_numpy(self._crowd_boxes[crowd].copy()),  # [C, 4]
        }
        if self.has_annotations:  # test-dev (image info only) has no ground truth to evaluate
            target |= {
                "eval_boxes": torch.from_numpy(self._eval_boxes[ev]),  # [G, 4], original pixels, read-only use
                "eval_labels": torch.from_numpy(self._eval_labels[ev]),  # [G]
                "eval_iscrowd": torch.from_numpy(self._eval_iscrowd[ev]),  # [G]
                "eval_area": torch.from_numpy(self._eval_area[ev]),  # [G]
            }
        if turn != 1:  # annotated on the stored pixels: the boxes turn with the image
            for key in ("boxes", "crowd_boxes", "eval_boxes"):
                if key in target:
                    target[key] = orient_boxes(target[key], turn, w, h)
            h, w = w, h
            target["exif_turn"] = turn
        target |= {"orig_size": (h, w), "img_size": (h, w), "scale_factor": (1.0, 1.0), "flipped": False}
        if self.transforms is None:
            from sapd.data.transforms import to_normalized_tensor

            return to_normalized_tensor(img), target
        return self.transforms(img, target, generator=generator)


def to_annotation_frame(boxes: torch.Tensor, target: dict) -> torch.Tensor:
    """Boxes [M, 4] in the original pixels of ``target``'s image as read (upright) -> in the frame of
    its annotation file: turned back for an image annotated on its stored pixels (``exif_turn``,
    see :class:`COCODetection`), unchanged otherwise."""
    turn = int(target.get("exif_turn", 1))
    if turn == 1:
        return boxes
    h, w = target["orig_size"]
    return orient_boxes(boxes, EXIF_INVERSE.get(turn, turn), w, h)
