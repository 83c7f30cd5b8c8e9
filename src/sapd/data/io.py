"""Reading images: the one place where sapd decodes an image file.

Training, evaluation (:class:`sapd.data.coco.COCODetection`) and ``python -m sapd.predict`` all read
through :func:`read_image`; :func:`sapd.data.transforms.preprocess_image` brings an image that is
already open to the same form with :func:`to_rgb`. The result is always a PIL image in mode RGB
(the transforms resize and flip uint8 PIL images, the cheapest path on a CPU):

- the EXIF orientation is applied (phones store a portrait as a rotated landscape plus a flag),
  so sizes and boxes are those of the image as it is displayed;
- grayscale (8 or 16 bit), palette (with or without transparency), RGBA / LA, CMYK and other
  modes become RGB (transparent pixels keep their colour; the alpha channel is dropped).

A file that cannot be read raises :class:`BadImageError` (a ``DataError``) whose ``reason`` says why;
a data set with ``skip_bad_images`` returns a :class:`SkippedImage` for it instead of an item.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sapd.data import DataError

# why an image could not be used: BadImageError.reason and SkippedImage.reason
MISSING, UNREADABLE, TOO_LARGE, WRONG_SIZE = "missing", "unreadable", "too_large", "wrong_size"


class BadImageError(DataError):
    """One image file that cannot be used; ``reason`` is ``"missing"``, ``"unreadable"`` (not an
    image, truncated, corrupt, a folder), ``"too_large"`` (over PIL's decompression-bomb limit) or
    ``"wrong_size"`` (its size differs from its annotation's)."""

    def __init__(self, message: str, reason: str = UNREADABLE) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with its reason (it may be raised in a DataLoader worker)
        return type(self), (str(self), self.reason)


class SkippedImage(NamedTuple):
    """What a data set with ``skip_bad_images`` returns instead of an item for an image it could not
    use: :func:`sapd.data.transforms.collate` drops it from the batch and records it."""

    image_id: int | None
    reason: str  # MISSING, UNREADABLE, TOO_LARGE or WRONG_SIZE
    message: str  # the one-line error, naming the file


def _bomb_message(path: str | Path, error: Exception) -> str:
    """One line for PIL's DecompressionBombError: the file, its pixels, the limit and how to raise it."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"image {path} is too large to decode: {pixels}, over the limit of {2 * limit:,} pixels "
        f"(2 x PIL.Image.MAX_IMAGE_PIXELS = 2 x {limit:,}) that guards against decompression bombs; "
        "if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS (None: no limit) in Python before "
        "the images are read"
    )


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


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of ``image`` (1..8; 1, "as stored", when absent or unreadable)."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except (TypeError, ValueError, OSError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def read_image(path: str | Path, *, exif: bool = True) -> Image.Image:
    """Decode the image file ``path`` fully into an RGB PIL image (see :func:`to_rgb`).

    Raises:
        BadImageError: (a ``DataError``) one line naming ``path``, when the file is missing, is not
            an image (a text file named ``.jpg``), is truncated / corrupt, or has more pixels than
            2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb error; the message gives the
            pixel count, the limit and how to raise it). Between 1 and 2 x that limit PIL only
            warns (``DecompressionBombWarning``) and the image is read.
    """
    return read_image_oriented(path, exif=exif)[0]


def read_image_oriented(path: str | Path, *, exif: bool = True) -> tuple[Image.Image, int]:
    """:func:`read_image` and the file's EXIF orientation tag (:func:`exif_orientation`), which tells
    how the stored pixels were turned to give the image returned (when ``exif``)."""
    try:
        with Image.open(path) as im:
            im.load()  # decode here, while the file is open: a truncated file fails now, not later
            return to_rgb(im, exif=exif), exif_orientation(im)
    except FileNotFoundError:
        raise BadImageError(f"image file not found: {path}", MISSING) from None
    except IsADirectoryError:
        raise BadImageError(f"cannot decode image {path}: it is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(_bomb_message(path, e), TOO_LARGE) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode image {path}: {e}") from None
