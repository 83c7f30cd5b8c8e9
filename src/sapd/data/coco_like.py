"""A small drawn data set with COCO 2017's own quirks, in COCO's file layout (``benchmarks/rehearse.py``).

``make_coco_like(root, num_train=..., num_val=...)`` draws images with
:mod:`sapd.data.synthetic_drawing` (shapes, textures, clutter, occlusion, crowd clusters) and writes them
as COCO 2017 is laid out::

    root/annotations/instances_train2017.json   root/train2017/000000000001.jpg ...
    root/annotations/instances_val2017.json     root/val2017/000000100001.jpg ...
    root/coco_like.json                          (the parameters; marks a finished set)

so ``data=coco data.root=root`` (``experiment=r50``) reads it as it reads COCO. What it has of COCO:

- the 80 categories with COCO's ids (1..90 with gaps) and names; the 8 drawn shapes are annotated as
  8 of them (:data:`SHAPE_TO_COCO`, the first id 1 and the last id 90 among them), the other 72 have
  no instance, as a rare class has few;
- images without any annotation (``empty_frac``, at least one per split), listed in ``images``;
- crowd regions (``iscrowd=1``) as compressed RLE (``counts`` a string, ``pycocotools.mask``), and in
  each split one image whose every annotation is crowd;
- zero-size boxes (``w`` or ``h`` = 0, ``area`` 0) beside ordinary ones, and in the training split one
  image whose only annotation is such a box;
- grayscale JPEGs (mode ``L``) and JPEGs with an EXIF orientation of 6 or 8 (rotated 90 degrees on
  display). As in COCO, ``width`` / ``height`` and the boxes are those of the stored pixels, not of
  the displayed image.

:func:`quirks` counts each kind in a written split. The set is a pure function of its parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sapd.data import DataError
from sapd.data.synthetic_drawing import CATEGORIES as SHAPES
from sapd.data.synthetic_drawing import VAL_ID_OFFSET, SyntheticParams, render_image

GENERATOR_VERSION = 1
MARKER = "coco_like.json"
SPLIT_FILES = {"train": ("annotations/instances_train2017.json", "train2017"),
               "val": ("annotations/instances_val2017.json", "val2017")}  # fmt: skip
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 6: rotate 90 degrees clockwise on display, 8: counter-clockwise
# drawn shape id (sapd.data.synthetic_drawing.CATEGORIES) -> the COCO category it is annotated as
SHAPE_TO_COCO = {1: 37, 3: 72, 4: 38, 7: 1, 10: 60, 13: 90, 18: 55, 21: 34}


def coco_categories() -> list[dict]:
    """COCO 2017's 80 categories ``{"id", "name"}``, ids 1..90 with COCO's gaps (from torchvision's
    COCO-trained weights' metadata, where a gap's name is ``N/A``; nothing is downloaded)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    return [{"id": i, "name": n} for i, n in enumerate(names) if n not in ("__background__", "N/A")]


@dataclass(frozen=True)
class CocoLikeParams:
    """Every parameter the files depend on."""

    num_train: int = 200
    num_val: int = 40
    seed: int = 0
    min_side: int = 96  # image sides drawn in [min_side, max_side]
    max_side: int = 160
    max_objects: int = 6
    crowd_frac: float = 0.1  # images with a crowd region (besides the all-crowd one)
    empty_frac: float = 0.01  # images without annotations, at least one per split
    zero_size_every: int = 20  # every n-th image gets one more box, of zero width or height
    gray_every: int = 10  # every n-th image is grayscale
    exif_every: int = 10  # every n-th image (other than the grayscale ones) is stored with an EXIF rotation
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.num_train < 8 or self.num_val < 4:
            raise DataError(f"coco_like: need num_train >= 8 and num_val >= 4, got {self.num_train}, {self.num_val}")
        if min(self.zero_size_every, self.gray_every, self.exif_every) < 2:
            raise DataError("coco_like: zero_size_every, gray_every and exif_every must be >= 2")

    def digest(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _roles(n: int, p: CocoLikeParams, split: str) -> dict[int, str]:
    """Index -> the image's special role: "empty" (no annotation), "all_crowd", "zero_only"."""
    k = max(1, round(p.empty_frac * n))
    roles = {(j * n) // k + n // (2 * k): "empty" for j in range(k)}
    free = [i for i in range(n) if i not in roles]
    roles[free[len(free) // 3]] = "all_crowd"
    if split == "train":
        free = [i for i in range(n) if i not in roles]
        roles[free[(2 * len(free)) // 3]] = "zero_only"
    return roles


def _crowd(ann: dict, h: int, w: int) -> dict:
    """``ann`` turned into a crowd annotation with a compressed RLE of its segmentation."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
    rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    rle = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {**ann, "iscrowd": 1, "segmentation": rle}


def _zero_size_box(rng: np.random.Generator, image_id: int, h: int, w: int, cat_id: int) -> dict:
    x, y = float(rng.integers(0, w - 8)), float(rng.integers(0, h - 8))
    if rng.uniform() < 0.5:
        bw, bh = 0.0, float(rng.integers(1, 8))
    else:
        bw, bh = float(rng.integers(1, 8)), 0.0
    poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
    box = {"bbox": [x, y, bw, bh], "area": 0.0, "iscrowd": 0, "segmentation": [poly]}
    return {"image_id": image_id, "category_id": cat_id, **box}


def _draw_image(p: CocoLikeParams, split: str, index: int, image_id: int, role: str | None, out_dir: Path):
    """One image file and its annotations (without ids)."""
    base = SyntheticParams(
        seed=p.seed,
        min_side=p.min_side,
        max_side=p.max_side,
        max_objects=p.max_objects,
        min_object_size=min(8.0, 0.9 * p.min_side),
        empty_frac=0.0,
        crowd_frac=1.0 if role == "all_crowd" else p.crowd_frac,
        jpeg_quality=p.jpeg_quality,
    )
    image, anns = render_image((asdict(base), split, index, image_id, str(out_dir)))
    h, w = image["height"], image["width"]
    rng = np.random.default_rng([p.seed, 7, index, image_id])
    anns = [{**a, "category_id": SHAPE_TO_COCO[a["category_id"]]} for a in anns]
    for a in anns:
        if a["iscrowd"]:  # compressed RLE, as pycocotools writes it
            a["segmentation"] = _crowd(a, h, w)["segmentation"]
    if role == "empty":
        anns = []
    elif role == "all_crowd":
        anns = [a if a["iscrowd"] else _crowd(a, h, w) for a in anns]
    elif role == "zero_only":
        anns = [_zero_size_box(rng, image_id, h, w, SHAPE_TO_COCO[SHAPES[0]["id"]])]
    elif index % p.zero_size_every == p.zero_size_every // 2:
        anns.append(_zero_size_box(rng, image_id, h, w, SHAPE_TO_COCO[SHAPES[int(rng.integers(len(SHAPES)))]["id"]]))
    path = out_dir / image["file_name"]
    if index % p.gray_every == 1:
        with Image.open(path) as im:
            im.convert("L").save(path, quality=p.jpeg_quality)
    elif index % p.exif_every == 3 and w != h:  # a square image would look the same turned
        with Image.open(path) as im:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6 if (index // p.exif_every) % 2 == 0 else 8
            im.load()
            im.save(path, quality=p.jpeg_quality, exif=exif)
    return image, anns


def _write_split(p: CocoLikeParams, split: str, root: Path) -> None:
    n = p.num_train if split == "train" else p.num_val
    first_id = 1 if split == "train" else VAL_ID_OFFSET + 1
    ann_name, img_name = SPLIT_FILES[split]
    (root / img_name).mkdir(parents=True)
    roles = _roles(n, p, split)
    images, annotations = [], []
    for i in range(n):
        image, anns = _draw_image(p, split, i, first_id + i, roles.get(i), root / img_name)
        images.append(image)
        annotations += [{"id": first_id + len(annotations) + k, **a} for k, a in enumerate(anns)]
    dataset = {
        "info": {"description": f"sapd coco_like ({split}), generator v{GENERATOR_VERSION}", "year": 2017},
        "licenses": [{"id": 0, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    (root / ann_name).write_text(json.dumps(dataset, separators=(",", ":")))


def _drawn_digest(root: Path) -> str | None:
    """The parameters' digest recorded by the set drawn in ``root``; None when there is none or it is unreadable."""
    try:
        return json.loads((root / MARKER).read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def make_coco_like(root: str | os.PathLike, **params) -> Path:
    """Write the set into ``root`` (once: a finished set of the same parameters is reused) and return it.

    ``params`` are fields of :class:`CocoLikeParams`. The set is drawn in a temporary folder beside
    ``root`` and renamed into place; a non-empty ``root`` that is not such a set is never touched.
    """
    try:
        p = CocoLikeParams(**params)
    except TypeError as e:
        raise DataError(f"coco_like: {e} (known: {', '.join(CocoLikeParams.__dataclass_fields__)})") from None
    root = Path(root).expanduser()
    if _drawn_digest(root) == p.digest():  # drawn before with these parameters
        return root
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DataError(f"coco_like: {root} exists and is not a coco_like data set; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        for split in SPLIT_FILES:
            _write_split(p, split, tmp)
        meta = {"digest": p.digest(), "generator_version": GENERATOR_VERSION, "params": asdict(p)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def quirks(root: str | os.PathLike, split: str = "train") -> dict[str, int]:
    """How many of each COCO quirk split ``split`` of the set at ``root`` holds (read from its files)."""
    ann_name, img_name = SPLIT_FILES[split]
    data = json.loads((Path(root) / ann_name).read_text())
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    gray = exif = 0
    for im in data["images"]:
        with Image.open(Path(root) / img_name / im["file_name"]) as f:
            gray += f.mode == "L"
            exif += f.getexif().get(EXIF_ORIENTATION) in (6, 8)
    anns = data["annotations"]
    return {
        "images": len(data["images"]),
        "annotations": len(anns),
        "categories": len(data["categories"]),
        "no_annotations": sum(not v for v in by_image.values()),
        "all_crowd": sum(bool(v) and all(a["iscrowd"] for a in v) for v in by_image.values()),
        "crowd_rle": sum(a["iscrowd"] == 1 and isinstance(a["segmentation"].get("counts"), str) for a in anns),
        "zero_size_boxes": sum(min(a["bbox"][2], a["bbox"][3]) <= 0 for a in anns),
        "only_zero_size": sum(bool(v) and all(min(a["bbox"][2:]) <= 0 for a in v) for v in by_image.values()),
        "grayscale": gray,
        "exif_rotated": exif,
    }
