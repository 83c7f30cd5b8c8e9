"""The boxes of one COCO annotation file as per-image numpy arrays, with the counts of what was dropped.

Each field is one flat array sorted by image, image i's entries at ``offsets[kind][i]:offsets[kind][i + 1]``
(compressed sparse rows): a few bytes a box and no Python object per annotation, so that forked
DataLoader workers share the arrays instead of copying them page by page as reference counts change.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from sapd.data import DataError


def _csr(rows: np.ndarray, n: int, *arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of ``arrays`` grouped by image: ``offsets`` [n + 1] and each array sorted by ``rows``
    (stable, so json order within an image), image i's entries at ``offsets[i]:offsets[i + 1]``."""
    order = np.argsort(rows, kind="stable")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets, [np.ascontiguousarray(a[order]) for a in arrays]


class BoxArrays:
    """The training boxes, crowd boxes and evaluation ground truth of every image, read from the
    annotations ``anns`` of ``ann_file``; images are rows (``image_ids`` [N], ``sizes`` [N, 2] (h, w)).

    Each annotation is read so:

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

    Arrays (``kind`` "train", "crowd" or "eval" in ``offsets`` and :meth:`entries`): ``train_boxes``
    float32[M, 4] (clipped to the image) and ``train_labels`` int64[M]; ``crowd_boxes`` float32[C, 4]
    (clipped); ``eval_boxes`` float32[G, 4] (original pixels), ``eval_labels`` int64[G], ``eval_iscrowd``
    bool[G], ``eval_area`` float32[G]. ``counts``: ``annotations``, ``no_annotations``, ``unknown_image``,
    ``unknown_category`` (their ids in ``unknown_category_ids``), ``non_finite_boxes``, ``crowd``,
    ``degenerate_boxes``, ``zero_size_boxes``, ``outside_boxes``, ``tiny_boxes`` and ``boxes`` (see
    :class:`~sapd.data.coco.COCODetection`'s ``stats``).
    """

    def __init__(
        self,
        ann_file: Path,
        anns: list[dict],
        image_ids: np.ndarray,
        sizes: np.ndarray,
        cat_id_to_label: dict[int, int],
        all_ids: set[int],
        min_box_size: float,
    ) -> None:
        """Every annotation of the kept images into per-image arrays (:func:`_csr`), with the counts.

        One Python pass over the annotations reads the json's values (this is json, not the hot path);
        the box arithmetic is vectorised over all of them.
        """
        self.ann_file = ann_file
        self.counts: dict[str, int] = {"unknown_image": 0, "unknown_category": 0}
        self.unknown_category_ids: set = set()
        n = len(image_ids)
        row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
        rows, labels, bboxes, crowds, areas, kept = [], [], [], [], [], []
        any_rows = []  # the image of every annotation of the kept images, any category
        for ann in anns:
            image_id = ann.get("image_id")
            row = row_of.get(image_id) if type(image_id) is int else None
            if row is None:
                if not (type(image_id) is int and image_id in all_ids):  # else: an image past max_images
                    self.counts["unknown_image"] += 1
                continue
            any_rows.append(row)
            cat_id = ann.get("category_id")
            label = cat_id_to_label.get(cat_id) if type(cat_id) is int else None
            if label is None:
                self.counts["unknown_category"] += 1  # neither trained on nor evaluated
                self.unknown_category_ids.add(cat_id if isinstance(cat_id, Hashable) else repr(cat_id))
                continue
            rows.append(row)
            labels.append(label)
            bboxes.append(ann.get("bbox"))
            crowds.append(ann.get("iscrowd", 0))
            areas.append(ann.get("area"))
            kept.append(ann)
        per_image = np.bincount(np.array(any_rows, dtype=np.int64), minlength=n)  # [N] annotations of each image
        self.counts["annotations"] = len(any_rows)
        self.counts["no_annotations"] = int((per_image == 0).sum())

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
        hw = sizes[rows_np].astype(np.float64)  # [A, 2] (h, w) of each annotation's image
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
        s = self.counts
        s["non_finite_boxes"] = int((~finite).sum())
        s["crowd"] = int(crowd_ok.sum())
        s["degenerate_boxes"] = int((plain & ~size_ok).sum())
        s["zero_size_boxes"] = int((plain & ~sized).sum())
        s["outside_boxes"] = int((plain & sized & ~left).sum())
        s["tiny_boxes"] = int((plain & left & ~size_ok).sum())
        s["boxes"] = int(keep.sum())

        f32 = np.float32
        self.offsets: dict[str, np.ndarray] = {}
        self.offsets["train"], (self.train_boxes, self.train_labels) = _csr(
            rows_np[keep], n, clipped[keep].astype(f32), labels_np[keep]
        )
        self.offsets["crowd"], (self.crowd_boxes,) = _csr(rows_np[crowd_ok], n, clipped[crowd_ok].astype(f32))
        ev = in_eval
        self.offsets["eval"], (self.eval_boxes, self.eval_labels, self.eval_iscrowd, self.eval_area) = _csr(
            rows_np[ev], n, xyxy[ev].astype(f32), labels_np[ev], crowd[ev], area[ev].astype(f32)
        )

    def _refuse(self, ann: dict, what: str) -> None:
        raise DataError(
            f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')}) {what}; "
            "fix the annotation file (a COCO bbox is [x, y, width, height] in pixels, iscrowd 0 or 1)"
        )

    def entries(self, kind: str, row: int) -> slice:
        offsets = self.offsets[kind]
        return slice(int(offsets[row]), int(offsets[row + 1]))
