"""COCO annotation files: reading them and refusing, in one line, what would mix data up or fail later.

:func:`read_annotations` (the checked dict, optionally without segmentations), :func:`check_annotations`
(the file's structure: images, categories, ids), :func:`check_file_names` (``file_name`` leading out of
the data root) and :func:`load_coco` (pycocotools' ``COCO`` of a file, for evaluation).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

from sapd.data import COCO_HOWTO, DataError


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


def _outside(name: str, img_dir: Path, folders: Sequence[Path]) -> bool:
    """True when ``name`` (a json ``file_name``, read in ``img_dir``) is absolute or leads out of every
    one of ``folders`` (read lexically: ``..`` steps count; links are followed as the user made them)."""
    if os.path.isabs(name):
        return True
    if ".." not in name:  # nothing leads up: inside img_dir (the fast path of nearly every file)
        return False
    path = os.path.normpath(os.path.join(os.path.abspath(img_dir), name))
    return not any(path.startswith(os.path.abspath(f).rstrip(os.sep) + os.sep) for f in folders)


def check_file_names(ann_file: Path, images: list[dict], img_dir: Path, root, allow_outside_root: bool) -> None:
    """Refuses, in one line, an image of ``images`` (read from ``ann_file``) whose ``file_name`` is absolute or
    leads (``..``) out of ``img_dir`` and ``root``, unless ``allow_outside_root``."""
    if allow_outside_root:
        return
    folders = [img_dir] + ([Path(root)] if root is not None else [])
    for im in images:
        if _outside(im["file_name"], img_dir, folders):
            folders_named = " and ".join(str(f) for f in folders)
            raise DataError(
                f"{ann_file}: image id {im['id']} has file_name {im['file_name']!r}, which leads out of "
                f"{folders_named}; fix the annotation file, or set data.allow_outside_root=true to read images "
                "from anywhere"
            )
