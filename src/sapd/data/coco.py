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
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sapd.data import COCO_HOWTO, DataError
from sapd.data.annotations import check_file_names, load_coco, read_annotations
from sapd.data.box_arrays import BoxArrays
from sapd.data.io import UNREADABLE, WRONG_SIZE, BadImageError, SkippedImage, read_image_oriented
from sapd.data.transforms import EXIF_INVERSE, orient_boxes

Transform = Callable[[Image.Image, dict], tuple[torch.Tensor, dict]]


def _return_freed_memory() -> None:
    """Hands the memory the parsed json held back to the operating system (glibc keeps freed heap
    pages otherwise: on a COCO-sized file ~130 MB more RSS, which forked loader workers inherit).

    No ``gc.collect()``: the parsed json holds no reference cycles, so reference counting has freed it
    already, and a full collection costs ~0.3 s in a process that holds Lightning. Measured on a drawn
    30,000-image, 220,000-box file (``benchmarks/memory.py``'s drawing, 2026-12-05): RSS after parsing
    552.0 MiB with the collection, 553.0 and 553.9 MiB without.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps them
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


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

    The annotation file is checked first (:func:`~sapd.data.annotations.check_annotations`: repeated
    image or category ids, images without an integer id or a positive size, ``annotations`` not a list
    are refused in one line). Then each annotation is read into per-image arrays
    (:class:`~sapd.data.box_arrays.BoxArrays`, which says how each is read and what is dropped): the
    parsed json, segmentations and every key training and evaluation do not use are dropped after
    parsing. :attr:`coco` (pycocotools, segmentations included) re-reads the file when something asks
    for it.

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
        images = dataset["images"][: None if max_images is None else int(max_images)]
        self._image_ids = np.array([im["id"] for im in images], dtype=np.int64)  # [N] rows
        check_file_names(self.ann_file, images, self.img_dir, root, allow_outside_root)
        names = [im["file_name"].encode() for im in images]
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)  # every file name, utf-8, one buffer
        self._name_offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in names], out=self._name_offsets[1:])
        self._sizes = np.array([(im["height"], im["width"]) for im in images], dtype=np.int64).reshape(-1, 2)
        all_ids = {im["id"] for im in dataset["images"]}
        self._boxes = BoxArrays(
            self.ann_file,
            dataset.get("annotations", []),
            self._image_ids,
            self._sizes,
            self.cat_id_to_label,
            all_ids,
            min_box_size,
        )
        self.stats.update(self._boxes.counts)
        self.unknown_category_ids: set = self._boxes.unknown_category_ids
        del dataset, images, names  # the json is not needed any more: only the arrays stay
        _return_freed_memory()

        train_count = np.diff(self._boxes.offsets["train"])  # [N] training boxes per image
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
        b = self._boxes
        ev = b.entries("eval", self._row_of[int(img_id)])
        return {"boxes": b.eval_boxes[ev], "labels": b.eval_labels[ev], "iscrowd": b.eval_iscrowd[ev]}

    @property
    def aspect_ratios(self) -> list[float]:
        """``width / height`` of every image, from the annotation file (no image is read)."""
        hw = self._sizes[self._rows]  # [len(self), 2]
        return (hw[:, 1] / hw[:, 0]).tolist()

    def file_name(self, index: int) -> str:
        """The json ``file_name`` of item ``index``."""
        row = self._rows[index]
        return self._names[self._name_offsets[row] : self._name_offsets[row + 1]].tobytes().decode()

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
        b = self._boxes
        train, crowd, ev = (b.entries(kind, row) for kind in ("train", "crowd", "eval"))
        target = {
            "image_id": self.ids[index],
            "boxes": torch.from_numpy(b.train_boxes[train].copy()),  # [M, 4]
            "labels": torch.from_numpy(b.train_labels[train].copy()),  # [M]
            "crowd_boxes": torch.from_numpy(b.crowd_boxes[crowd].copy()),  # [C, 4]
        }
        if self.has_annotations:  # test-dev (image info only) has no ground truth to evaluate
            target |= {
                "eval_boxes": torch.from_numpy(b.eval_boxes[ev]),  # [G, 4], original pixels, read-only use
                "eval_labels": torch.from_numpy(b.eval_labels[ev]),  # [G]
                "eval_iscrowd": torch.from_numpy(b.eval_iscrowd[ev]),  # [G]
                "eval_area": torch.from_numpy(b.eval_area[ev]),  # [G]
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
