"""sapd.data.io.read_image, the one image decoder, on hand-made files of every awkward kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sapd.data import DataError
from sapd.data.io import read_image, to_rgb
from sapd.data.transforms import denormalize, preprocess_image

ORIENTATION = 0x0112


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def _exif_rotated(path, orientation: int = 6) -> None:
    """Stored 50 wide x 30 tall, red 8x8 top-left corner, rest white; ``orientation`` 6 displays it
    rotated 90 degrees clockwise: 30 wide x 50 tall with the red corner at the top right."""
    raw = np.full((30, 50, 3), 255, np.uint8)
    raw[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(raw).save(path, exif=exif, quality=95)


@pytest.mark.parametrize(
    ("mode", "fill", "rgb"),
    [
        ("L", 128, (128, 128, 128)),
        ("LA", (90, 0), (90, 90, 90)),  # fully transparent: the grey value stays
        ("RGBA", (10, 200, 10, 0), (10, 200, 10)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # pure red in CMYK
        ("I;16", 0x80FF, (128, 128, 128)),  # 16-bit grayscale: its top 8 bits, not clipped at 255
    ],
)
def test_modes_become_rgb(tmp_path, mode, fill, rgb):
    path = tmp_path / ("img.tif" if mode in ("CMYK", "I;16") else "img.png")
    Image.new(mode, (7, 5), fill).save(path)
    im = read_image(path)
    assert im.mode == "RGB" and im.size == (7, 5)
    assert tuple(_pixels(im)[2, 3]) == rgb


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images_keep_their_colours(tmp_path, transparency):
    pal = Image.new("P", (6, 4), 1)
    pal.putpixel((0, 0), 0)
    pal.putpalette([10, 20, 30, 0, 0, 250] + [0] * 762)
    path = tmp_path / "palette.png"
    pal.save(path, **({"transparency": 0} if transparency else {}))
    im = read_image(path)
    assert im.mode == "RGB"
    assert tuple(_pixels(im)[2, 3]) == (0, 0, 250)
    assert tuple(_pixels(im)[0, 0]) == (10, 20, 30)  # the transparent entry keeps its colour


def test_exif_orientation_is_applied_unless_asked_not_to(tmp_path):
    path = tmp_path / "phone.jpg"
    _exif_rotated(path)
    upright = _pixels(read_image(path))
    assert upright.shape == (50, 30, 3)  # displayed 30 wide x 50 tall
    assert upright[2, 27, 0] > 200 and upright[2, 27, 1] < 60  # red corner at the top right
    assert upright[2, 2].min() > 200  # top left is white
    stored = _pixels(read_image(path, exif=False))
    assert stored.shape == (30, 50, 3)
    assert stored[2, 2, 0] > 200 and stored[2, 2, 1] < 60  # red corner where it was stored


@pytest.mark.parametrize(("orientation", "corner"), [(3, (-3, -3)), (8, (-3, 2)), (2, (2, -3))])
def test_other_orientations(tmp_path, orientation, corner):
    path = tmp_path / f"o{orientation}.jpg"
    _exif_rotated(path, orientation)
    px = _pixels(read_image(path))
    assert px.shape[:2] == ((30, 50) if orientation in (2, 3) else (50, 30))
    red = px[corner]
    assert red[0] > 200 and red[1] < 60, (orientation, red)


def test_to_rgb_leaves_its_input_alone_and_preprocess_agrees_with_read_image(tmp_path):
    path = tmp_path / "phone.jpg"
    _exif_rotated(path)
    with Image.open(path) as opened:
        opened.load()
        gray = opened.convert("L")
        gray.info["exif"] = opened.info["exif"]
        out = to_rgb(gray)
        assert gray.mode == "L" and gray.size == (50, 30)  # untouched
        assert out.mode == "RGB" and out.size == (30, 50)
        x, meta = preprocess_image(opened, min_size=30, max_size=None)  # an image straight from Image.open
    assert meta["orig_size"] == (50, 30) and tuple(x.shape) == (3, 50, 30)
    decoded = torch.from_numpy(_pixels(read_image(path))).permute(2, 0, 1).float()
    assert torch.allclose(denormalize(x) * 255, decoded, atol=0.01)


def test_truncated_file_is_one_clear_error(tmp_path):
    full = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert read_image(full).size == (64, 64)
    with pytest.raises(DataError, match=r"cannot decode image .*cut\.jpg") as e:
        read_image(cut)
    assert "\n" not in str(e.value)


def test_text_file_named_jpg_missing_file_and_folder(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels\n")
    with pytest.raises(DataError, match=r"cannot decode image .*notes\.jpg"):
        read_image(text)
    with pytest.raises(DataError, match=r"image file not found: .*nope\.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match=r"cannot decode image .* a folder"):
        read_image(tmp_path)


def huge_png(path, width: int = 100_000, height: int = 100_000) -> None:
    """A few-byte PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_one_clear_error(tmp_path):
    from sapd.data.io import BadImageError

    bomb = tmp_path / "bomb.png"
    huge_png(bomb)
    with pytest.raises(DataError) as e:
        read_image(bomb)
    msg = str(e.value)
    assert isinstance(e.value, BadImageError) and e.value.reason == "too_large" and "\n" not in msg
    assert str(bomb) in msg and "10,000,000,000 pixels" in msg  # the file and its pixel count
    assert f"{2 * Image.MAX_IMAGE_PIXELS:,}" in msg and "PIL.Image.MAX_IMAGE_PIXELS" in msg  # the limit, and the knob


def test_decompression_bomb_limit_follows_pil_max_image_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")  # 400 pixels > 2 x 100: PIL's error
    Image.new("RGB", (12, 10)).save(tmp_path / "warn.png")  # 120 pixels, between 100 and 200: PIL warns
    with pytest.raises(DataError, match=r"big\.png is too large to decode: 400 pixels, over the limit of 200 pixels"):
        read_image(tmp_path / "big.png")
    with pytest.warns(Image.DecompressionBombWarning):
        assert read_image(tmp_path / "warn.png").size == (12, 10)
