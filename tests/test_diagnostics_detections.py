"""Drawing detections on an image (sapd.diagnostics.detections)."""

import torch
from PIL import Image

from sapd.diagnostics.detections import colour, draw_detections


def test_detections_are_drawn_in_their_class_colour_and_true_boxes_in_white():
    image = Image.new("RGB", (120, 90), (0, 0, 0))
    dets = {
        "boxes": torch.tensor([[10.0, 20.0, 70.0, 80.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([3]),
    }
    truth = {"boxes": torch.tensor([[80.0, 5.0, 115.0, 40.0]]), "labels": torch.tensor([0])}
    out = draw_detections(image, dets, ["a", "b", "c", "d"], ground_truth=truth)
    assert out.size == image.size and out.mode == "RGB" and image.getpixel((10, 50)) == (0, 0, 0)  # a new image
    assert out.getpixel((10, 50)) == colour(3)  # the left edge of the detection
    assert out.getpixel((80, 30)) == (255, 255, 255)  # the left edge of the true box
    assert out.getpixel((40, 60)) == (0, 0, 0)  # inside: not filled
    # the label sits on a patch of the box's colour at its top-left corner, with dark text on it
    patch = [out.getpixel((x, y)) for x in range(13, 35) for y in range(23, 32)]
    assert colour(3) in patch and any(sum(p) < 100 for p in patch)


def test_no_detection_and_no_truth_leave_the_image_as_it_was():
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    out = draw_detections(image, empty, ground_truth={"boxes": torch.zeros(0, 4), "labels": empty["labels"]})
    assert list(out.getdata()) == list(image.getdata())
