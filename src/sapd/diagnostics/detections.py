"""Pictures of detections: labelled boxes on images (for wandb, the predict CLI and :class:`sapd.Detector`)
and ``val_images.png`` (``test_images.png``) of ``report/``: the first images of the evaluated set with
predicted (score >= a threshold) and true boxes. That grid is the one part of the report that runs the
network again, on one batch of images.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from sapd.data.transforms import denormalize
from sapd.diagnostics.files import figure

IMAGES_PNG = "val_images.png"


def colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def unnormalize(image: Tensor, target: Mapping[str, Any] | None = None) -> Image.Image:
    """A normalised, padded network input back to a PIL image of the original size.

    Args:
        image (FloatTensor[3, H, W]): ImageNet-normalised, possibly padded.
        target: with ``img_size`` (h, w) before padding and ``orig_size`` (h, w); when given the
            padding is cropped and the image resized to its original size, so boxes in original
            pixels line up.
    """
    img = denormalize(image.detach().float()).clamp(0, 1)
    if target is not None:
        h, w = (int(v) for v in target["img_size"])
        img = img[:, :h, :w]
    pil = Image.fromarray((img * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    if target is not None:
        oh, ow = (int(v) for v in target["orig_size"])
        if (oh, ow) != (pil.height, pil.width):
            pil = pil.resize((ow, oh), Image.BILINEAR)
    return pil


def draw_detections(
    image: Image.Image,
    detections: Mapping[str, Tensor],
    class_names: Sequence[str] | None = None,
    *,
    ground_truth: Mapping[str, Tensor] | None = None,
    width: int = 2,
) -> Image.Image:
    """Draws predicted boxes (coloured, labelled with class and score) and true boxes (white, thin),
    with ``torchvision.utils.draw_bounding_boxes``.

    Args:
        image: the original image.
        detections: ``boxes`` (FloatTensor[D, 4]) x1, y1, x2, y2 in the image's pixels, ``scores``,
            ``labels`` (contiguous).
        class_names: names of the contiguous labels (else the label number is written).
        ground_truth: optional ``boxes`` and ``labels`` drawn in white.
    Returns:
        a new RGB image.
    """
    picture = pil_to_tensor(image.convert("RGB"))  # uint8 [3, H, W]
    if ground_truth is not None and len(ground_truth["boxes"]):
        picture = draw_bounding_boxes(picture, ground_truth["boxes"].detach().cpu().float(), colors="white", width=1)
    labels = [int(label) for label in detections["labels"].tolist()]
    if labels:
        names = [class_names[k] if class_names is not None and k < len(class_names) else str(k) for k in labels]
        texts = [f"{name} {score:.2f}" for name, score in zip(names, detections["scores"].tolist())]
        picture = draw_bounding_boxes(
            picture,
            detections["boxes"].detach().cpu().float(),
            labels=texts,
            colors=[colour(k) for k in labels],
            width=width,
            label_colors="black",
            fill_labels=True,  # black text on the box's colour
        )
    return to_pil_image(picture)


@torch.no_grad()
def detect_first_images(module, dataset, num_images: int, size_divisor: int = 128) -> tuple[list, list, list]:
    """The first ``num_images`` items of ``dataset`` through ``module.detect`` in eval mode (one batch).

    Returns:
        the network inputs (FloatTensor[3, h, w] each, unpadded), their targets and their detections
        (original pixels, on the CPU).
    """
    from sapd.data.transforms import collate

    items = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not items:
        return [], [], []
    images, targets = collate(items, size_divisor=size_divisor)  # drops images skipped as bad
    if not len(targets):
        return [], [], []
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        dets = module.detect(images.to(device), targets)
    finally:
        module.train(was_training)
    dets = [{k: v.detach().cpu() for k, v in d.items()} for d in dets]
    return list(images), targets, dets


def plot_detections_grid(
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Tensor]],
    path: Path,
    *,
    score_thresh: float,
    class_names: Sequence[str] | None = None,
    title: str = "validation images",
) -> Path:
    """Images with predicted boxes (score >= ``score_thresh``, coloured and labelled) and true boxes (white)."""
    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(math.ceil(n / cols), 1)
    fig = figure(4.2 * cols, 4.2 * rows + 0.7)
    for i, (image, target, det) in enumerate(zip(images, targets, detections)):
        keep = det["scores"] >= score_thresh
        pred = {k: v[keep] for k, v in det.items()}
        gt = None
        if "eval_boxes" in target:
            gt = {"boxes": target["eval_boxes"], "labels": target["eval_labels"]}
        picture = draw_detections(unnormalize(image, target), pred, class_names, ground_truth=gt)
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(picture))
        true = f", {len(gt['boxes'])} true" if gt is not None else ""
        ax.set_title(f"image {int(target['image_id'])}: {int(keep.sum())} predicted{true}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        f"{title}: predictions with score \u2265 {score_thresh:.2f} (coloured, class and score), ground truth (white)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)
    return path
