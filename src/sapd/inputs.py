"""The image inputs of the inference API (:class:`sapd.api.Detector`): which kinds it takes, the cheap checks
made before anything is decoded, and the conversion of each kind to a PIL image."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sapd.data import DataError
from sapd.data.io import read_image

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


def is_single(images: Any) -> bool:
    """Whether ``images`` is one input (-> one result) rather than a list or a 4-D batch."""
    if isinstance(images, (str, Path, Image.Image)):
        return True
    if isinstance(images, (np.ndarray, Tensor)):
        return images.ndim != 4  # (N, ...) is a batch; other ranks are refused later, one image at a time
    return False


def as_list(images: Any) -> list[Any]:
    """``images`` (a list, an iterable, or a 4-D batch) as a list of single inputs; one clear error otherwise."""
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (bytes, bytearray, Mapping)) or not isinstance(images, Iterable):
        raise TypeError(
            f"images: cannot read an image from a {type(images).__name__}; give a path, a PIL image, a numpy "
            "array (H, W, 3) uint8 RGB, a torch tensor (3, H, W), or a list of them"
        )
    return list(images)


def check_input(image: Any, where: str = "image") -> None:
    """The cheap checks of one input (kind, shape, dtype, the file exists), before anything is decoded.

    Raises:
        DataError: a missing file, or an array / tensor that is not an RGB image (wrong rank,
            channels or dtype); the message names ``where`` and says what to give instead.
        TypeError: an object of another kind.
    """
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise DataError(f"{where}: image file not found: {image}")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise DataError(
                f"{where}: numpy array of shape {tuple(image.shape)} is not an image; "
                "give (H, W, 3) uint8 in RGB order (a grayscale image: np.stack([a] * 3, axis=-1))"
            )
        if image.dtype != np.uint8:
            raise DataError(
                f"{where}: numpy array of dtype {image.dtype}; give uint8 in 0..255 "
                "(from floats in [0, 1]: (a * 255).round().astype(np.uint8))"
            )
    elif isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
            raise DataError(
                f"{where}: tensor of shape {tuple(image.shape)} is not an image; give (3, H, W) RGB, "
                "uint8 in 0..255 or float in [0, 1]"
            )
        if not (image.dtype == torch.uint8 or image.dtype.is_floating_point):
            raise DataError(f"{where}: tensor of dtype {image.dtype}; give uint8 in 0..255 or float in [0, 1]")
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"{where}: cannot read an image from a {type(image).__name__}; give a path, a PIL image, "
            "a numpy array (H, W, 3) uint8 RGB or a torch tensor (3, H, W)"
        )


def to_pil(image: ImageInput, where: str = "image") -> Image.Image:
    """One input of :class:`Detector` as a PIL image (made upright and RGB later by :func:`preprocess_image`).

    Raises what :func:`check_input` raises, and :class:`DataError` for a file that cannot be decoded
    or a float tensor with values outside [0, 1].
    """
    check_input(image, where)
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    x = image.detach()
    if x.dtype.is_floating_point:
        lo, hi = (float(v) for v in x.aminmax())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise DataError(
                f"{where}: float tensor with values in [{lo:.3g}, {hi:.3g}]; give values in [0, 1] "
                "(from 0..255: x / 255; not normalised with a mean and std)"
            )
        x = x.float().mul(255.0).round_().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")
