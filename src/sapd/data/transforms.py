"""Train / eval transforms, batch collation and inference preprocessing.

Every transform is ``(image, target) -> (image, target)``: the image is a PIL RGB image until
:class:`ToTensorNormalize` (resizing and flipping uint8 PIL images is the cheapest path on CPU),
``target`` is the dict of :class:`sapd.data.coco.COCODetection`. Boxes are ``x1, y1, x2, y2``
pixels in the current image's frame; ``scale_factor = (sx, sy) = resized / original`` per axis,
so ``box_original = box_resized / (sx, sy, sx, sy)`` exactly (MMDetection's ``Resize`` keeps the
same per-axis ``w_scale, h_scale`` for the same reason).

Plain tensor code rather than ``torchvision.transforms.v2``: the three operations are a few lines
each, and the exact box arithmetic is easy to check against the docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from sapd.data import DataError
from sapd.data.io import SkippedImage, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BOX_KEYS = ("boxes", "crowd_boxes")


def _size_range(min_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(min_size, int | float):
        lo = hi = int(min_size)
    else:
        vals = [int(v) for v in min_size]
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise DataError(f"min_size must be an int or [min, max], got {list(min_size)}")
        lo, hi = vals
    if not 0 < lo <= hi:
        raise DataError(f"min_size must satisfy 0 < min <= max, got [{lo}, {hi}]")
    return lo, hi


def resized_shape(h: int, w: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(new_h, new_w): shorter side ``min_size``, longer side at most ``max_size``, aspect kept
    (detectron2 ``ResizeShortestEdge.get_output_shape``; rounded to the nearest pixel)."""
    scale = min_size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class Resize:
    """Resize keeping the aspect ratio: shorter side = ``min_size`` (int) or an integer drawn
    uniformly from ``[min, max]`` (scale jitter, e.g. [640, 800] for the 2x recipe), longer side
    capped at ``max_size``. Boxes are scaled by (sx, sy) = (new_w / w, new_h / h)."""

    def __init__(self, min_size: int | Sequence[int], max_size: int | None = 1333) -> None:
        self.min_size, self.max_size = _size_range(min_size), max_size

    def __call__(
        self, img: Image.Image, target: dict, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, dict]:
        lo, hi = self.min_size
        # generator: the sample's own (training: seeded by data seed, epoch and index, so a resumed run
        # draws the same sizes); None: torch's global RNG
        short = lo if lo == hi else int(torch.randint(lo, hi + 1, (), generator=generator).item())
        w, h = img.size
        nh, nw = resized_shape(h, w, short, self.max_size)
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), Image.BILINEAR)
        sx, sy = nw / w, nh / h
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        for k in _BOX_KEYS:
            if k in target:
                target[k] = target[k] * scale  # [M, 4]
        osx, osy = target.get("scale_factor", (1.0, 1.0))
        target["scale_factor"] = (osx * sx, osy * sy)
        target["img_size"] = (nh, nw)
        return img, target


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror boxes [M, 4] in an image of ``width`` pixels: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


# EXIF orientation tag -> the tag whose turn undoes it (5 and 7 are mirror images of themselves, 6 and 8
# turn a quarter each way, 2-4 undo themselves)
EXIF_INVERSE = {6: 8, 8: 6}


def orient_boxes(boxes: torch.Tensor, orientation: int, width: float, height: float) -> torch.Tensor:
    """Boxes [M, 4] (x1, y1, x2, y2) of an image stored ``width`` x ``height`` moved with its pixels when
    EXIF ``orientation`` (1..8, as PIL's ``ImageOps.exif_transpose``) is applied: the same boxes in
    the image as displayed (``height`` x ``width`` for 5..8). Orientation 1 returns ``boxes``.

    The inverse is ``orient_boxes(b, EXIF_INVERSE.get(o, o), *displayed size)``.
    """
    if orientation not in range(2, 9):
        return boxes
    x1, y1, x2, y2 = boxes.unbind(-1)  # each [M]
    w, h = float(width), float(height)
    corners = {
        2: (w - x2, y1, w - x1, y2),  # mirrored left-right
        3: (w - x2, h - y2, w - x1, h - y1),  # turned 180 degrees
        4: (x1, h - y2, x2, h - y1),  # mirrored top-bottom
        5: (y1, x1, y2, x2),  # transposed
        6: (h - y2, x1, h - y1, x2),  # turned 90 degrees clockwise
        7: (h - y2, w - x2, h - y1, w - x1),  # transverse
        8: (y1, w - x2, y2, w - x1),  # turned 90 degrees anticlockwise
    }[orientation]
    return torch.stack(corners, dim=-1)  # [M, 4]


class RandomHorizontalFlip:
    """Flip the image and its boxes left-right with probability ``p``; toggles ``target['flipped']``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(
        self, img: Image.Image, target: dict, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, dict]:
        if self.p <= 0 or torch.rand((), generator=generator).item() >= self.p:
            return img, target
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for k in _BOX_KEYS:
            if k in target:
                target[k] = hflip_boxes(target[k], img.width)
        target["flipped"] = not target.get("flipped", False)
        return img, target


def to_normalized_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL RGB -> FloatTensor[3, h, w], ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [h, w, 3]
    x = x.permute(2, 0, 1).float().div_(255.0)  # [3, h, w]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of :func:`to_normalized_tensor` for [3, h, w] or [N, 3, h, w]: values in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m


class ToTensorNormalize:
    """PIL RGB -> normalised FloatTensor[3, h, w] (ImageNet mean / std by default)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, img: Image.Image, target: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        return to_normalized_tensor(img, self.mean, self.std), target


class Compose:
    """The transforms in order; ``generator`` (the random draws of every one) is passed to each."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, img, target: dict, generator: torch.Generator | None = None):
        for t in self.transforms:
            img, target = t(img, target, generator=generator)
        return img, target


def eval_size(
    min_size: int | Sequence[int],
    max_size: int | None,
    val_min_size: int | None = None,
    val_max_size: int | None = None,
) -> tuple[int, int | None]:
    """(shorter side, longer-side cap) at evaluation: ``val_*`` where set, else the largest
    ``min_size`` (800 for both 1x and the [640, 800] jitter) and ``max_size``."""
    short = _size_range(min_size)[1] if val_min_size is None else int(val_min_size)
    return short, (max_size if val_max_size is None else int(val_max_size))


def build_transforms(
    *, train: bool, min_size: int | Sequence[int] = 800, max_size: int | None = 1333, flip_prob: float = 0.5
) -> Compose:
    """Paper §4.1: train = jittered resize + flip + normalise; eval = resize to the largest
    ``min_size`` (800 for both 1x and the [640, 800] jitter) + normalise."""
    if train:
        return Compose([Resize(min_size, max_size), RandomHorizontalFlip(flip_prob), ToTensorNormalize()])
    return Compose([Resize(_size_range(min_size)[1], max_size), ToTensorNormalize()])


class BatchTargets(list):
    """The targets of a collated batch (a list of dicts) plus ``skipped``: the
    :class:`~sapd.data.io.SkippedImage` records of the images :func:`collate` dropped. ``copy.copy``
    (the DataLoader's pin-memory thread) keeps ``skipped``; rebuilding the list (Lightning's precision
    conversion, moving the batch to a device) does not, so it is read as the batch leaves the loader:
    :class:`~sapd.data.loaders.RecordingDataLoader`."""

    def __init__(self, targets=(), skipped=()) -> None:
        super().__init__(targets)
        self.skipped: list[SkippedImage] = list(skipped)


def collate(batch: Sequence[tuple[torch.Tensor, dict]], size_divisor: int = 128) -> tuple[torch.Tensor, list[dict]]:
    """Stack images, zero-padded at the bottom / right to a common size divisible by ``size_divisor``.

    Args:
        batch: N items ``(FloatTensor[3, h_i, w_i], target_i)``; an item that is a
            :class:`~sapd.data.io.SkippedImage` (an image a data set with ``skip_bad_images`` could
            not use) or None is dropped, so the batch holds N' <= N images.
    Returns:
        images FloatTensor[N', 3, Hp, Wp] (Hp, Wp multiples of ``size_divisor``; padding is 0 after
        normalisation, i.e. the mean colour, as MMDetection pads), and the N' targets as a
        :class:`BatchTargets`, each with ``img_size`` (h_i, w_i) and ``pad_size`` (Hp, Wp) set; its
        ``skipped`` lists the N - N' dropped items (a None as ``SkippedImage(None, "unknown", ...)``).
        When every item was dropped: images FloatTensor[0, 3, d, d] (d = ``size_divisor``) and no
        targets; the training / evaluation steps skip such a batch.
    """
    if len(batch) == 0:
        raise DataError("collate: empty batch")
    skipped = [b for b in batch if b is None or isinstance(b, SkippedImage)]
    if skipped:
        batch = [b for b in batch if not (b is None or isinstance(b, SkippedImage))]
        skipped = [SkippedImage(None, "unknown", "the data set returned None") if s is None else s for s in skipped]
    d = max(int(size_divisor), 1)
    if not batch:
        return torch.zeros((0, 3, d, d)), BatchTargets(skipped=skipped)
    images, targets = zip(*batch)
    hp = math.ceil(max(im.shape[-2] for im in images) / d) * d
    wp = math.ceil(max(im.shape[-1] for im in images) / d) * d
    out = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))  # [N, 3, Hp, Wp]
    targets = BatchTargets(targets, skipped)
    for i, im in enumerate(images):  # a loop over images, not boxes
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        targets[i]["img_size"] = (int(im.shape[-2]), int(im.shape[-1]))
        targets[i]["pad_size"] = (hp, wp)
    return out, targets


def preprocess_image(
    image: Image.Image, *, min_size: int | Sequence[int] = 800, max_size: int | None = 1333
) -> tuple[torch.Tensor, dict]:
    """Inference preprocessing of one PIL image of any mode, brought upright and to RGB by
    :func:`sapd.data.io.to_rgb` (an image read by :func:`sapd.data.io.read_image` already is).

    Returns:
        FloatTensor[3, h, w] normalised (not padded: pass a list through :func:`collate`, or pad),
        and ``meta`` with ``orig_size`` (H, W), ``img_size`` (h, w) and ``scale_factor`` (sx, sy):
        a box predicted in the resized image maps back by dividing by (sx, sy, sx, sy).
    """
    image = to_rgb(image)
    target = {"orig_size": (image.height, image.width), "scale_factor": (1.0, 1.0)}
    img, target = Resize(_size_range(min_size)[1], max_size)(image, target)
    meta = {k: target[k] for k in ("orig_size", "img_size", "scale_factor")}
    return to_normalized_tensor(img), meta
