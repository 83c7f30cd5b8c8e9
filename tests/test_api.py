"""The Python inference API, ``sapd.Detector``, on a checkpoint trained a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from sapd import Detections, Detector
from sapd.api import SCORE_THRESH
from sapd.data import DataError
from sapd.data.transforms import collate, preprocess_image


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    """The shared checkpoint trained a few steps (tiny model, synthetic data) and its validation images."""
    ckpt, datamodule = tiny_checkpoint
    images = sorted(Path(datamodule.val_dataset.img_dir).glob("*.jpg"))
    assert len(images) >= 6
    return ckpt, images, datamodule


@pytest.fixture(scope="module")
def det(trained):
    # A model trained three steps scores about 0.01 everywhere: threshold 0 shows its 100 best boxes.
    return Detector.from_checkpoint(trained[0], device="cpu", score_thresh=0.0)


def assert_equal(a: Detections, b: Detections) -> None:
    assert len(a) > 0 and a.image_size == b.image_size
    for key in ("boxes", "scores", "labels", "category_ids"):
        assert torch.equal(a[key], b[key]), key
    assert a.names == b.names


def stable_prefix(scores: torch.Tensor, gap: float = 1e-6) -> int:
    """How many leading detections are ordered by more than numerical noise (consecutive score gaps > gap).

    A detection's survival of NMS depends only on the detections scored above it, so this prefix
    cannot change with float noise of a different batch; below it, near-ties may swap.
    """
    gaps = scores[:-1] - scores[1:]
    small = torch.nonzero(gaps <= gap)
    return int(small[0]) if len(small) else len(scores)


def assert_close(a: Detections, b: Detections) -> int:
    """The stable prefix of ``a`` is in ``b``, in the same order, within float noise; returns its length."""
    k = stable_prefix(a.scores)
    assert a.image_size == b.image_size and len(b) >= k
    assert torch.equal(a.labels[:k], b.labels[:k])
    torch.testing.assert_close(a.scores[:k], b.scores[:k], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.boxes[:k], b.boxes[:k], atol=1e-3, rtol=0)
    return k


@pytest.mark.slow
def test_every_input_kind_gives_the_same_detections(det, trained):
    path = trained[1][0]
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil).copy()  # (H, W, 3) uint8 RGB
    uint8 = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
    reference = det(path)
    assert isinstance(reference, Detections) and reference.image_size == (pil.height, pil.width)
    for image in (str(path), pil, array, uint8, uint8.float() / 255, uint8.double() / 255):
        assert_equal(det(image), reference)
    mixed = det([path, pil, array, uint8, uint8.float() / 255])  # one batch of five
    assert isinstance(mixed, list) and len(mixed) == 5
    assert sum(assert_close(reference, r) for r in mixed) >= 5


@pytest.mark.slow
def test_a_list_keeps_its_order_and_a_batch_tensor_is_a_list(det, trained):
    paths = trained[1][:4]
    singles = [det(p) for p in paths]
    assert [r.image_size for r in det(paths)] == [r.image_size for r in singles]
    assert det([]) == []
    same = [Image.open(paths[0]).convert("RGB")] * 2
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in same])  # (2, 3, H, W)
    out = det(batch)
    assert isinstance(out, list) and len(out) == 2
    assert_close(singles[0], out[0])


@pytest.mark.slow
def test_boxes_are_in_the_pixels_of_the_original_image(det, trained):
    """The API equals the network run by hand at the run's evaluation size, boxes divided by the resize."""
    _, images, datamodule = trained
    assert (det.min_size, det.max_size) == (128, 192)  # TINY's data.min_size / data.max_size
    small = Image.open(images[1]).convert("RGB")
    big = small.resize((small.width * 2, small.height * 2), Image.BILINEAR)
    for image in (small, big):
        tensor, meta = preprocess_image(image, min_size=det.min_size, max_size=det.max_size)
        batch, _ = collate([(tensor, dict(meta))], size_divisor=det.size_divisor)
        net = det.net
        with torch.no_grad():  # at the detector's threshold 0, in resized pixels
            dets = net.postprocess(net(batch), [meta["img_size"]], None, score_thresh=0.0)[0]
        sx, sy = meta["scale_factor"]
        got = det(image)
        assert got.image_size == (image.height, image.width)
        assert torch.equal(got.labels, dets["labels"]) and torch.equal(got.scores, dets["scores"])
        torch.testing.assert_close(got.boxes, dets["boxes"] / torch.tensor([sx, sy, sx, sy]))
        assert (got.boxes[:, 2] <= image.width + 1e-3).all() and (got.boxes[:, 3] <= image.height + 1e-3).all()
    assert det(big).boxes[:, 2:].max() > small.width  # 2x image: boxes reach past the small image's size
    names = list(datamodule.class_names)
    got = det(small)
    assert got.names == [names[i] for i in got.labels.tolist()]
    assert got.category_ids.tolist() == [datamodule.label_to_cat_id[i] for i in got.labels.tolist()]


@pytest.mark.slow
def test_a_lower_threshold_leaves_the_shared_network_as_it_is(det, trained, monkeypatch):
    """A call below the network's own threshold passes it per call: the network's settings are never swapped
    during a call (another thread using the same network would see them)."""
    post, seen, postprocess = det.net.postprocessor, [], det.net.postprocess

    def spy(*args, **kwargs):
        seen.append((det.net.postprocessor, kwargs.get("score_thresh")))
        return postprocess(*args, **kwargs)

    monkeypatch.setattr(det.net, "postprocess", spy)
    low = det(trained[1][0], score_thresh=0.01)
    assert seen == [(post, 0.01)] and det.net.postprocessor is post
    assert len(low) > 0 and float(low.scores.min()) >= 0.01


@pytest.mark.slow
def test_the_batch_size_does_not_change_the_detections(det, trained):
    paths = [*trained[1][:4], trained[1][0]]  # the repeat shares a padded size with the first
    one = det(paths, batch_size=1)
    many = det(paths, batch_size=4)
    assert sum(assert_close(a, b) for a, b in zip(one, many)) >= len(paths)


@pytest.mark.slow
def test_batches_hold_images_of_one_padded_size(det, trained, monkeypatch):
    seen = []
    forward = det.net.forward

    def spy(images):
        seen.append(tuple(images.shape))
        return forward(images)

    monkeypatch.setattr(det.net, "forward", spy)
    square = Image.new("RGB", (100, 100), (90, 120, 30))
    wide = Image.new("RGB", (200, 100), (90, 120, 30))
    out = det([square, wide, square, square, wide], batch_size=2)
    assert [r.image_size for r in out] == [(100, 100), (100, 200), (100, 100), (100, 100), (100, 200)]
    assert sorted(s[0] for s in seen) == [1, 2, 2] and len({s[2:] for s in seen}) == 2


@pytest.mark.slow
def test_score_thresh_filters_and_defaults_to_predicts(trained, det, tmp_path):
    path = trained[1][2]
    everything = det(path)
    assert len(everything) == 100  # threshold 0: max_detections of the model
    cut = float(everything.scores[40])
    kept = det(path, score_thresh=cut)
    assert 0 < len(kept) < len(everything) and (kept.scores >= cut).all()
    assert torch.equal(kept.boxes, everything.boxes[: len(kept)])
    # one default for the API and predict, declared once (sapd.api.SCORE_THRESH, read by conf/predict.yaml)
    default = Detector.from_checkpoint(trained[0], device="cpu")
    predict_cfg = compose_config("predict", ["ckpt_path=x", "input=y"], tmp_path)
    assert default.score_thresh == predict_cfg.score_thresh == SCORE_THRESH == 0.4
    assert all((r.scores >= 0.4).all() for r in default(trained[1][:2]))
    everything_it_returns = Detector.from_checkpoint(trained[0], device="cpu", score_thresh=None)
    assert everything_it_returns.score_thresh == everything_it_returns.net.postprocessor.score_thresh == 0.05
    assert Detector(det.net, min_size=128, max_size=None, device="cpu", score_thresh=0.3).score_thresh == 0.3
    with pytest.raises(ValueError, match=r"score_thresh must be in \[0, 1\]; got 1.5"):
        det(path, score_thresh=1.5)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        det(path, batch_size=0)


@pytest.mark.slow
def test_results_under_inference_mode_and_editable_outside(det, trained):
    path = trained[1][3]
    outside = det(path)
    with torch.inference_mode():
        inside = det(path)
    assert_equal(inside, outside)
    assert not outside.boxes.is_inference()
    outside.boxes[:, 0] += 1.0  # results are ordinary tensors: in-place edits work
    assert outside.boxes.device.type == "cpu"


@pytest.mark.slow
def test_bad_inputs_are_one_clear_error(det, trained, tmp_path):
    good = trained[1][0]
    cases = [
        (tmp_path / "missing.jpg", DataError, r"image: image file not found: .*missing\.jpg"),
        (np.zeros((32, 32), np.uint8), DataError, r"numpy array of shape \(32, 32\) is not an image"),
        (np.zeros((32, 32, 3), np.float64), DataError, r"numpy array of dtype float64; give uint8"),
        (torch.zeros(3, 32, 32, dtype=torch.int32), DataError, r"tensor of dtype torch.int32"),
        (
            torch.full((3, 32, 32), 200.0),
            DataError,
            r"float tensor with values in \[200, 200\]; give values in \[0, 1\]",
        ),
        (torch.zeros(32, 32, 3, dtype=torch.uint8), DataError, r"tensor of shape \(32, 32, 3\) is not an image"),
        (42, TypeError, r"cannot read an image from a int"),
    ]
    for image, error, message in cases:
        with pytest.raises(error, match=message):
            det(image)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        det(broken)
    calls = []
    forward = det.net.forward
    det.net.forward = lambda images: calls.append(1) or forward(images)
    try:  # a bad item of a list is named by its position, before any image is run
        with pytest.raises(DataError, match=r"images\[2\]: numpy array of shape \(8, 8\)"):
            det([good, good, np.zeros((8, 8), np.uint8)], batch_size=1)
    finally:
        del det.net.forward
    assert calls == []


@pytest.mark.slow
def test_device_handling(trained):
    from sapd.api import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA GPU here; use device=cpu"):
            Detector.from_checkpoint(trained[0], device="cuda")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_detections(trained, det):
    gpu = Detector.from_checkpoint(trained[0], device="cuda", score_thresh=0.0)
    assert gpu.device.type == "cuda" and next(gpu.net.parameters()).is_cuda
    image = torch.from_numpy(np.array(Image.open(trained[1][0]).convert("RGB"))).permute(2, 0, 1).cuda()
    got = gpu(image)
    assert got.boxes.device.type == "cpu"
    k = stable_prefix(det(trained[1][0]).scores, gap=1e-4)
    ref = det(trained[1][0])
    assert torch.equal(got.labels[:k], ref.labels[:k])
    torch.testing.assert_close(got.boxes[:k], ref.boxes[:k], atol=1e-2, rtol=0)


LIGHT = """
import sys, sapd
assert "torch" not in sys.modules, "torch imported"
# what composing a command's config and sapd.report need: the settings' declarations, not the model
import sapd.paths, sapd.report.command
from sapd.checks import SETTINGS
from sapd.models import settings
sapd.paths.register_configs()
heavy = sorted(m for m in ("torch", "timm", "lightning", "matplotlib") if m in sys.modules)
assert not heavy, heavy
from sapd import Detector
assert "lightning" not in sys.modules
print(Detector.__module__)
"""


def test_import_sapd_stays_light():
    """``import sapd``, config composition and sapd.report without torch; the API without Lightning."""
    code = LIGHT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sapd.api"


def test_threshold_measurement_matches_in_score_order():
    """The matching behind predict's default threshold (benchmarks/score_threshold.py)."""
    from benchmarks.score_threshold import counts_by_threshold, match_in_score_order

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 90.0, 90.0]])
    gt_cats, crowd = torch.tensor([1, 1, 2]), torch.tensor([False, False, True])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # TP
            [0.0, 0.0, 10.0, 9.0],  # duplicate of a matched box: FP
            [20.0, 20.0, 30.0, 30.0],  # right box, wrong class: FP
            [60.0, 60.0, 70.0, 70.0],  # inside the crowd region of its class: ignored
            [20.0, 21.0, 30.0, 30.0],  # TP
        ]
    )
    cats = torch.tensor([1, 1, 2, 2, 1])
    tp, ignored = match_in_score_order(boxes, cats, gt, gt_cats, crowd, 0.5)
    assert tp.tolist() == [True, False, False, False, True] and ignored.tolist() == [False, False, False, True, False]
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert counts_by_threshold(scores, tp, ignored, [0.5, 0.75, 0.95]) == [(4, 2), (2, 1), (0, 0)]
