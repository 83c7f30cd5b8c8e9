"""Drawing detections: labelled boxes on images, for wandb and the predict CLI."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

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
    """Draws predicted boxes (coloured, labelled with class and score) and true boxes (white, thin).

    Args:
        image: the original image.
        detections: ``boxes`` (FloatTensor[D, 4]) x1, y1, x2, y2 in the image's pixels, ``scores``,
            ``labels`` (contiguous).
        class_names: names of the contiguous labels (else the label number is written).
        ground_truth: optional ``boxes`` and ``labels`` drawn in white.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    if ground_truth is not None:
        for box in ground_truth["boxes"].tolist():
            draw.rectangle(box, outline=(255, 255, 255), width=1)
    boxes = detections["boxes"].tolist()
    scores = detections["scores"].tolist()
    labels = detections["labels"].tolist()
    for box, score, label in zip(boxes, scores, labels):
        c = colour(int(label))
        draw.rectangle(box, outline=c, width=width)
        name = class_names[int(label)] if class_names is not None and int(label) < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        x, y = box[0], max(box[1] - 11, 0)
        tw = draw.textlength(text, font=font)
        draw.rectangle([x, y, x + tw + 2, y + 11], fill=c)
        draw.text((x + 1, y), text, fill=(0, 0, 0), font=font)
    return out
