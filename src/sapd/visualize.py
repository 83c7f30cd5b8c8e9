"""Drawing detections: labelled boxes on images, for wandb and the predict CLI."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from sapd.data.transforms import denormalize


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
