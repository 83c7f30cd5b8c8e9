"""Reading images: the one place where sapd decodes an image file.

Training, evaluation (:class:`sapd.data.coco.COCODetection`) and ``python -m sapd.predict`` all read
through :func:`read_image`; :func:`sapd.data.transforms.preprocess_image` brings an image that is
already open to the same form with :func:`to_rgb`. The result is always a PIL image in mode RGB
(the transforms resize and flip uint8 PIL images, the cheapest path on a CPU):

- the EXIF orientation is applied (phones store a portrait as a rotated landscape plus a flag),
  so sizes and boxes are those of the image as it is displayed;
- grayscale (8 or 16 bit), palette (with or without transparency), RGBA / LA, CMYK and other
  modes become RGB (transparent pixels keep their colour; the alpha channel is dropped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sapd.data import DataError


def to_rgb(image: Image.Image, *, exif: bool = True) -> Image.Image:
    """``image`` upright (its EXIF orientation applied, unless ``exif=False``) and in mode RGB.

    Returns a new image; ``image`` itself is left as it is.
    """
    image = ImageOps.exif_transpose(image) if exif else image.copy()
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    elif image.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits (PIL would clip at 255)
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(path: str | Path, *, exif: bool = True) -> Image.Image:
    """Decode the image file ``path`` fully into an RGB PIL image (see :func:`to_rgb`).

    Raises:
        DataError: one line naming ``path``, when the file is missing, is not an image (a text file
            named ``.jpg``), or is truncated / corrupt.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode here, while the file is open: a truncated file fails now, not later
            return to_rgb(im, exif=exif)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"cannot decode image {path}: it is a folder, not an image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None
