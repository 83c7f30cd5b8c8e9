"""Drawing the synthetic set (:mod:`sapd.data.synthetic`): its parameters, one image and its annotations.

Coloured, textured shapes (8 classes with COCO-like gaps in the category ids) on cluttered
backgrounds. Each image has its own RNG seeded by ``(seed, split, index)``, so the set is a pure
function of :class:`SyntheticParams` and a process pool gives byte-identical files.

What it exercises, like COCO: object sizes log-uniform from ``min_object_size`` (8 px) up to
most of the image, so every pyramid level P3-P7 gets instances; 0-``max_objects`` objects per
image with overlaps (an occluded object is annotated with its full box; one more than
``1 - min_visible`` hidden is dropped); ~5 % images with no object; crowd regions (a cluster of
small objects of one class annotated once with ``iscrowd=1`` and an uncompressed RLE mask);
distractor lines and blobs that are not objects; solid / stripes / noise / gradient textures.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sapd.data import DataError

# Bump when the drawing code changes, so cached sets made by older code are not reused.
GENERATOR_VERSION = 1

# Non-contiguous ids, like COCO's gaps (COCO 2017 uses 80 ids out of 1..90).
CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "supercategory": "round"},
    {"id": 3, "name": "square", "supercategory": "polygon"},
    {"id": 4, "name": "triangle", "supercategory": "polygon"},
    {"id": 7, "name": "star", "supercategory": "polygon"},
    {"id": 10, "name": "ring", "supercategory": "round"},
    {"id": 13, "name": "cross", "supercategory": "polygon"},
    {"id": 18, "name": "ellipse", "supercategory": "round"},
    {"id": 21, "name": "diamond", "supercategory": "polygon"},
]
TEXTURES = ("solid", "stripes", "noise", "gradient")
SPLITS = {"train": 0, "val": 1}
VAL_ID_OFFSET = 100_000  # val image / annotation ids start here (ids are unique across splits)


@dataclass(frozen=True)
class SyntheticParams:
    """Every parameter the pixels and annotations depend on (hashed into the cache folder name)."""

    num_train: int = 2000
    num_val: int = 250
    seed: int = 0
    min_side: int = 192  # image sides are drawn independently in [min_side, max_side]
    max_side: int = 320
    max_objects: int = 20  # objects per non-empty image: uniform in 1..max_objects
    min_object_size: float = 8.0  # object extent (px), log-uniform in [min, max_object_frac * short side]
    max_object_frac: float = 0.9
    empty_frac: float = 0.05  # fraction of images with no object
    crowd_frac: float = 0.05  # fraction of non-empty images with one crowd region
    truncate_frac: float = 0.1  # objects allowed to be cut by the image border
    min_visible: float = 0.2  # drop an object with less than this fraction of its pixels visible
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise DataError(f"synthetic: num_train / num_val must be >= 0, got {self.num_train}, {self.num_val}")
        if not 32 <= self.min_side <= self.max_side:
            raise DataError(
                f"synthetic: need 32 <= min_side <= max_side, got min_side={self.min_side}, max_side={self.max_side}"
            )
        if self.max_objects < 0 or not 0 <= self.empty_frac <= 1 or not 0 <= self.crowd_frac <= 1:
            raise DataError("synthetic: max_objects must be >= 0 and empty_frac, crowd_frac in [0, 1]")
        if not 2 <= self.min_object_size <= self.max_object_frac * self.min_side:
            raise DataError(
                f"synthetic: min_object_size={self.min_object_size} must be in "
                f"[2, max_object_frac * min_side = {self.max_object_frac * self.min_side}]"
            )

    def digest(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    """Vertices [n, 2] of a regular n-gon of circumradius r centred at 0."""
    a = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _rotate(p: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _shape_polygons(name: str, size: float, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons ``[(vertices [V, 2] centred at 0, fill 255 or 0)]`` drawing one shape of extent ~size.

    The first polygon is the outer contour (used as the COCO segmentation).
    """
    r = size / 2
    if name == "circle":
        return [(_regular(64, r, 0.0), 255)]
    if name == "ring":  # a disc with a round hole: 0.45-0.65 of the radius
        return [(_regular(64, r, 0.0), 255), (_regular(64, r * rng.uniform(0.45, 0.65), 0.0), 0)]
    if name == "ellipse":  # clearly elongated (aspect 0.35-0.6), any orientation
        p = _regular(64, r, 0.0) * np.array([1.0, rng.uniform(0.35, 0.6)])
        return [(_rotate(p, rng.uniform(0, np.pi)), 255)]
    if name == "square":  # near axis-aligned, so it stays distinct from the diamond
        return [(_regular(4, r * 1.05, np.pi / 4 + rng.uniform(-0.25, 0.25)), 255)]
    if name == "diamond":  # a tall rhombus
        p = np.array([[0, -r], [r * rng.uniform(0.45, 0.65), 0], [0, r], [-r * rng.uniform(0.45, 0.65), 0]])
        return [(_rotate(p, rng.uniform(-0.2, 0.2)), 255)]
    if name == "triangle":
        return [(_regular(3, r * 1.1, rng.uniform(0, 2 * np.pi)), 255)]
    if name == "star":  # five points, inner radius 0.4-0.5
        outer, inner = _regular(5, r * 1.05, rng.uniform(0, 2 * np.pi)), None
        inner = _rotate(outer, np.pi / 5) * rng.uniform(0.4, 0.5)
        return [(np.stack([outer, inner], 1).reshape(10, 2), 255)]
    if name == "cross":  # a plus sign, arm thickness 0.3-0.4 of the extent
        t = r * rng.uniform(0.3, 0.4)
        p = np.array(
            [[-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t], [t, r], [-t, r], [-t, t], [-r, t], [-r, -t], [-t, -t]]
        )
        return [(_rotate(p, rng.uniform(-0.35, 0.35)), 255)]
    raise AssertionError(name)


def _vivid_colour(rng: np.random.Generator, away_from: np.ndarray) -> np.ndarray:
    """A saturated RGB colour (float[3], 0-255), the farthest from ``away_from`` among 4 tries."""
    cands = np.array(
        [colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)) for _ in range(4)]
    )
    cands = cands * 255.0
    return cands[np.argmax(((cands - away_from) ** 2).sum(1))]


def _texture(kind: str, h: int, w: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture float[h, w, 3] in 0-255 based on ``colour``."""
    if kind == "solid":
        return np.broadcast_to(colour, (h, w, 3))
    second = colour * rng.uniform(0.25, 0.55) if rng.uniform() < 0.5 else 255 - (255 - colour) * 0.3
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)  # [h, w]
    if kind == "stripes":
        period = rng.uniform(4, 12)
        on = ((proj / period) % 1.0) < 0.5
        return np.where(on[..., None], colour, second)
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        return colour * (1 - t[..., None]) + second * t[..., None]
    if kind == "noise":
        return colour + rng.normal(0.0, 28.0, (h, w, 1)).astype(np.float32)
    raise AssertionError(kind)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Muted gradient + low-frequency blotches + pixel noise: float[h, w, 3] in 0-255."""
    base = rng.uniform(50, 200)
    c1, c2 = base + rng.uniform(-45, 45, 3), base + rng.uniform(-45, 45, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1.0))[..., None]
    img = c1 * (1 - t) + c2 * t  # [h, w, 3]
    # blotches: coarse noise upsampled by PIL (bilinear), amplitude up to 30
    gh, gw = max(2, h // 24), max(2, w // 24)
    coarse = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
    blot = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32) - 127.5
    img += blot * rng.uniform(0.0, 0.25)
    img += rng.normal(0.0, rng.uniform(3, 16), (h, w, 1)).astype(np.float32)
    return img


def _distractors(pil: Image.Image, rng: np.random.Generator, muted: np.ndarray) -> None:
    """Random lines and irregular blobs drawn in place: clutter that is not an object."""
    w, h = pil.size
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 9))):
        xy = [tuple(rng.uniform(0, [w, h]).tolist()) for _ in range(2)]
        colour = tuple(int(v) for v in np.clip(muted + rng.uniform(-90, 90, 3), 0, 255))
        draw.line(xy, fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 6))):
        n = int(rng.integers(9, 15))
        r = rng.uniform(5, 28) * rng.uniform(0.55, 1.0, n)  # ragged radii: no class looks like this
        a = np.sort(rng.uniform(0, 2 * np.pi, n))
        c = rng.uniform(0, [w, h])
        pts = np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a)], 1)
        colour = tuple(int(v) for v in np.clip(muted + rng.uniform(-60, 60, 3), 0, 255))
        draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)


def _render_mask(polys: list[tuple[np.ndarray, int]], cx: float, cy: float, h: int, w: int):
    """Rasterise polygons centred at (cx, cy). Returns (mask bool[bh, bw], x0, y0, outer polygon) in
    image coordinates, the mask cropped to the image; None when nothing lands inside the image."""
    outer = polys[0][0] + np.array([cx, cy])
    x0, y0 = math.floor(outer[:, 0].min()), math.floor(outer[:, 1].min())
    x1, y1 = math.ceil(outer[:, 0].max()) + 1, math.ceil(outer[:, 1].max()) + 1
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for p, fill in polys:
        q = p + np.array([cx - x0, cy - y0])
        draw.polygon([tuple(v) for v in q.tolist()], fill=fill)
    mask = np.asarray(canvas) > 0
    # crop to the image
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    mask = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    if not mask.any():
        return None
    return mask, cx0, cy0, outer


def _tight_box(mask: np.ndarray, x0: int, y0: int) -> list[float]:
    """COCO xywh of the True pixels of ``mask`` placed at (x0, y0): pixel edges, so w = cols spanned."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return [float(x0 + cols[0]), float(y0 + rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def rle_encode(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool[h, w] mask: column-major run lengths starting with a 0-run
    (the format of COCO's own crowd annotations; pycocotools ``frPyObjects`` reads it)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def render_image(job: tuple) -> tuple[dict, list[dict]]:
    """Draw one image, write its JPEG, return (COCO image entry, annotations without ids)."""
    p, split, index, image_id, out_dir = job
    p = SyntheticParams(**p)
    rng = np.random.default_rng([p.seed, SPLITS[split], index])
    w, h = (int(v) for v in rng.integers(p.min_side, p.max_side + 1, 2))
    img = _background(h, w, rng)
    muted = img.reshape(-1, 3).mean(0)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _distractors(pil, rng, muted)
    img = np.asarray(pil, dtype=np.float32).copy()

    n = 0 if rng.uniform() < p.empty_frac else int(rng.integers(1, p.max_objects + 1)) if p.max_objects else 0
    lo, hi = math.log(p.min_object_size), math.log(p.max_object_frac * min(h, w))
    sizes = np.exp(rng.uniform(lo, hi, n))
    # larger objects mostly behind smaller ones, with noise so occlusion goes both ways
    order = np.argsort(-(np.log(sizes) + rng.normal(0, 0.6, n)))
    objects = []  # (category_id, mask, x0, y0, outer polygon, iscrowd)
    for i in order.tolist():
        s, cat = sizes[i], CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        polys = _shape_polygons(cat["name"], s, rng)
        if rng.uniform() < p.truncate_frac:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        else:  # keep the whole shape (extent <= ~1.1 s) inside the image where it fits
            m = min(0.55 * s, w / 2, h / 2)
            cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
        r = _render_mask(polys, cx, cy, h, w)
        if r is not None:
            objects.append((cat["id"], *r, 0))
    if n and rng.uniform() < p.crowd_frac:  # a cluster of tiny objects of one class, annotated once
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        extent = rng.uniform(30, 70)
        ox, oy = rng.uniform(0, max(w - extent, 1)), rng.uniform(0, max(h - extent, 1))
        union = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(6, 16))):
            r = _render_mask(
                _shape_polygons(cat["name"], rng.uniform(5, 11), rng),
                ox + rng.uniform(0, extent),
                oy + rng.uniform(0, extent),
                h,
                w,
            )
            if r is not None:
                m, x0, y0, _ = r
                union[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] |= m
        if union.any():
            objects.append((cat["id"], union, 0, 0, None, 1))

    owner = np.full((h, w), -1, np.int32)  # index into objects of the top-most object per pixel
    for k, (_, mask, x0, y0, _, _) in enumerate(objects):
        bh, bw = mask.shape
        region, own = img[y0 : y0 + bh, x0 : x0 + bw], owner[y0 : y0 + bh, x0 : x0 + bw]
        colour = _vivid_colour(rng, region[mask].mean(0))
        tex = _texture(TEXTURES[int(rng.integers(len(TEXTURES)))], bh, bw, colour, rng)
        region[mask] = tex[mask]
        own[mask] = k
    visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]

    anns = []
    for k, (cat_id, mask, x0, y0, outer, iscrowd) in enumerate(objects):
        area = int(mask.sum())
        if iscrowd:
            seg = rle_encode(mask)
        else:
            if visible[k] < p.min_visible * area:
                continue  # mostly hidden: dropped, as COCO annotators would not label it
            poly = np.clip(outer, 0, [w, h]).round(2)
            seg = [[float(v) for v in poly.ravel()]]
        box = _tight_box(mask, x0, y0)
        if min(box[2], box[3]) < 2:
            continue  # a sliver at the border
        anns.append(
            {
                "image_id": image_id,
                "category_id": cat_id,
                "bbox": box,
                "area": float(area),
                "iscrowd": iscrowd,
                "segmentation": seg,
            }
        )
    file_name = f"{image_id:012d}.jpg"
    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(
        Path(out_dir) / file_name, quality=p.jpeg_quality
    )
    return {"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 0}, anns
