"""Transforms: exact box arithmetic under resize and flip, normalisation, collate padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sapd.data import DataError
from sapd.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    Resize,
    ToTensorNormalize,
    collate,
    denormalize,
    hflip_boxes,
    preprocess_image,
    resized_shape,
)


def _sample(w=100, h=50, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    boxes = torch.tensor([[10.0, 5.0, 40.0, 45.0], [0.0, 0.0, w, h], [70.5, 20.25, 99.0, 21.5]])
    target = {"boxes": boxes.clone(), "crowd_boxes": boxes[:1].clone(), "orig_size": (h, w)}
    return img, target, boxes


def test_flip_twice_is_identity():
    img, target, boxes = _sample()
    flip = RandomHorizontalFlip(p=1.0)
    once, t1 = flip(img, dict(target))
    assert not torch.equal(t1["boxes"], boxes) and t1["flipped"]
    assert torch.equal(t1["boxes"][0], torch.tensor([60.0, 5.0, 90.0, 45.0]))  # x1' = W - x2
    # the flipped box covers the flipped pixels
    assert np.array_equal(np.asarray(once)[:, 60:90], np.asarray(img)[:, 10:40][:, ::-1])
    twice, t2 = flip(once, t1)
    assert torch.equal(t2["boxes"], boxes) and torch.equal(t2["crowd_boxes"], boxes[:1]) and not t2["flipped"]
    assert np.array_equal(np.asarray(twice), np.asarray(img))


def test_flip_probability():
    img, target, boxes = _sample()
    never = RandomHorizontalFlip(p=0.0)
    assert torch.equal(never(img, dict(target))[1]["boxes"], boxes)
    torch.manual_seed(0)
    flips = sum(RandomHorizontalFlip(0.5)(img, dict(target))[1].get("flipped", False) for _ in range(200))
    assert 60 < flips < 140


def test_hflip_boxes_empty():
    assert hflip_boxes(torch.zeros(0, 4), 10).shape == (0, 4)


@pytest.mark.parametrize(
    ("h", "w", "min_size", "max_size", "expected"),
    [
        (50, 100, 80, 1333, (80, 160)),  # shorter side to min_size
        (20, 100, 80, 200, (40, 200)),  # longer side capped
        (480, 640, 800, 1333, (800, 1067)),  # COCO-like: 640 * 800 / 480 = 1066.67 -> 1067
        (427, 640, 800, 1333, (800, 1199)),
    ],
)
def test_resized_shape(h, w, min_size, max_size, expected):
    assert resized_shape(h, w, min_size, max_size) == expected


def test_resize_scales_boxes_exactly_and_maps_back():
    img, target, boxes = _sample(w=97, h=61)
    out, t = Resize(800, 1333)(img, dict(target))
    nw, nh = out.size
    assert t["img_size"] == (nh, nw) == (800, 1272)
    sx, sy = t["scale_factor"]
    assert (sx, sy) == (nw / 97, nh / 61) and sx != sy  # per-axis factors, rounding kept
    assert torch.equal(t["boxes"], boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float32))
    back = t["boxes"] / torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(back, boxes, atol=1e-4)
    assert t["boxes"][1].tolist() == [0.0, 0.0, nw, nh]  # the full-image box stays the full image


def test_resize_jitter_samples_the_range():
    img, target, _ = _sample(w=100, h=50)
    torch.manual_seed(0)
    shorts = {Resize([64, 72], 1000)(img, dict(target))[1]["img_size"][0] for _ in range(60)}
    assert shorts <= set(range(64, 73)) and len(shorts) >= 5
    with pytest.raises(DataError, match="min_size"):
        Resize([800, 640])


def test_normalise_round_trip():
    img, target, _ = _sample()
    x, _ = ToTensorNormalize()(img, target)
    assert x.shape == (3, 50, 100) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.5  # roughly centred
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    assert torch.allclose(denormalize(x), ref, atol=1e-6)


def test_pipeline_flip_then_map_back():
    img, target, boxes = _sample(w=90, h=70)
    tf = Compose([Resize(100, 200), RandomHorizontalFlip(1.0), ToTensorNormalize()])
    x, t = tf(img, dict(target))
    sx, sy = t["scale_factor"]
    w_resized = t["img_size"][1]
    unflipped = hflip_boxes(t["boxes"], w_resized)
    assert x.shape[1:] == t["img_size"]
    assert torch.allclose(unflipped / torch.tensor([sx, sy, sx, sy]), boxes, atol=1e-4)


def test_collate_pads_to_multiple_of_divisor_with_zeros():
    a = torch.randn(3, 100, 150)
    b = torch.randn(3, 130, 90)
    images, targets = collate([(a, {"image_id": 1}), (b, {"image_id": 2})], size_divisor=128)
    assert images.shape == (2, 3, 256, 256)
    assert torch.equal(images[0, :, :100, :150], a) and torch.equal(images[1, :, :130, :90], b)
    assert images[0, :, 100:].abs().sum() == 0 and images[0, :, :, 150:].abs().sum() == 0
    assert images[1, :, 130:].abs().sum() == 0 and images[1, :, :, 90:].abs().sum() == 0
    assert [t["img_size"] for t in targets] == [(100, 150), (130, 90)]
    assert targets[0]["pad_size"] == (256, 256)
    exact, _ = collate([(torch.ones(3, 128, 256), {})], size_divisor=128)
    assert exact.shape == (1, 3, 128, 256)
    assert collate([(a, {})], size_divisor=32)[0].shape == (1, 3, 128, 160)
    with pytest.raises(DataError):
        collate([])


def test_preprocess_image_any_mode():
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 128))
    x, meta = preprocess_image(rgba, min_size=100, max_size=1000)
    assert x.shape == (3, 100, 150)
    assert meta == {"orig_size": (200, 300), "img_size": (100, 150), "scale_factor": (0.5, 0.5)}
    assert torch.allclose(denormalize(x)[:, 50, 75], torch.tensor([1.0, 0.0, 0.0]), atol=1e-2)
    gray, meta = preprocess_image(Image.new("L", (64, 64)), min_size=[640, 800], max_size=1333)
    assert gray.shape == (3, 800, 800) and meta["scale_factor"] == (12.5, 12.5)
