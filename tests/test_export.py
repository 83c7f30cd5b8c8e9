"""sapd.export: ONNX and TorchScript files that give PyTorch's detections, the mapping back to the
original image, the refusals, and the export benchmark's smoke run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from conftest import TINY, compose_config
from sapd import export as sapd_export
from sapd.checkpoint import CheckpointError, load_module
from sapd.data.io import read_image
from sapd.data.transforms import collate, preprocess_image
from sapd.export import ExportedModel, ExportError, match_detections, parity_ok, to_original_pixels
from sapd.paths import initialize_configs

ROOT = Path(__file__).resolve().parents[1]
# Photographs that ship inside scikit-image (no download): colour, grey, large and small.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def export_config(*overrides: str):
    """conf/export.yaml with ``overrides``, as ``python -m sapd.export`` composes it."""
    GlobalHydra.instance().clear()
    with initialize_configs():
        return compose("export", overrides=list(overrides))


def photographs() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The shared tiny SAPD trained a few steps, its score threshold lowered so that it detects, exported by
    the command's own function in both formats; the module, the run config, the two files and the folder of
    its validation images."""
    ckpt, datamodule = tiny_checkpoint
    out = tmp_path_factory.mktemp("export")
    module, run_cfg = load_module(ckpt)
    # A few steps leave every score near the 0.01 prior: keep the top 3 % of a photograph's (point, class)
    # pairs, so that images keep tens of detections and some fewer than max_detections.
    tensor, _ = preprocess_image(photographs()[0], min_size=128, max_size=192)
    with torch.no_grad():
        scores = module.net(tensor[None])["cls_logits"].sigmoid().flatten()
    raw = torch.load(ckpt, weights_only=False)
    raw["sapd_config"]["model"]["postprocess"]["score_thresh"] = float(torch.quantile(scores, 0.97))
    lowered = out / "lowered.ckpt"
    torch.save(raw, lowered)
    files = {}
    for fmt in ("onnx", "torchscript"):
        result = sapd_export.export(export_config(f"ckpt_path={lowered}", f"format={fmt}"))
        files[fmt] = Path(result["output"])
        assert parity_ok(result["parity"]), result["parity"]  # the command's own check on random batches
    module, run_cfg = load_module(lowered)
    return module, run_cfg, files, Path(datamodule.val_dataset.img_dir)


def _batches(val_dir: Path):
    """(PIL images, min_size, max_size): several batch sizes and padded sizes, photographs and synthetic
    (the validation images of the checkpoint's set in ``val_dir``)."""
    photos = photographs()
    drawn = sorted(val_dir.glob("*.jpg"))
    synthetic = [read_image(p) for p in drawn[:4]]
    assert len(synthetic) == 4
    return [
        (photos[:1], 128, 192),
        (photos[1:4], 160, 256),
        (photos[3:], 96, 160),
        (synthetic[:2], 128, 192),
        (photos[:2] + synthetic, 200, 320),
    ]


@pytest.mark.slow
def test_onnx_runtime_and_torchscript_give_pytorchs_detections(exported):
    module, run_cfg, files, val_dir = exported
    net = module.net.float().eval()
    divisor = int(run_cfg.data.size_divisor)
    runners = {fmt: ExportedModel(path) for fmt, path in files.items()}
    totals = {fmt: {"detections": 0, "max_abs_box": 0.0, "max_rel_box": 0.0, "max_abs_score": 0.0} for fmt in files}
    shapes = set()
    for pils, min_size, max_size in _batches(val_dir):
        items = [preprocess_image(p, min_size=min_size, max_size=max_size) for p in pils]
        images, targets = collate(items, size_divisor=divisor)
        shapes.add(tuple(images.shape))
        sizes = [t["img_size"] for t in targets]
        scales = [t["scale_factor"] for t in targets]
        with torch.no_grad():  # PyTorch, as sapd.predict runs it: original pixels
            reference = net.postprocess(net(images), sizes, scales)
        assert any(len(r["scores"]) for r in reference)
        for fmt, run in runners.items():
            outputs = run(images.numpy(), np.array(sizes))
            boxes, scores, labels, counts = outputs
            n = len(pils)
            assert boxes.shape == (n, 100, 4) and scores.shape == labels.shape == (n, 100) and counts.shape == (n,)
            assert (labels[np.arange(100)[None] >= counts[:, None]] == -1).all()  # empty slots
            assert (np.diff(scores, axis=1)[np.arange(99)[None] < counts[:, None] - 1] <= 0).all()  # sorted
            stats = match_detections(reference, to_original_pixels(*outputs, sizes, scales))
            assert parity_ok(stats), (fmt, tuple(images.shape), stats)
            totals[fmt]["detections"] += stats["detections"]
            for key in ("max_abs_box", "max_rel_box", "max_abs_score"):
                totals[fmt][key] = max(totals[fmt][key], stats[key])
    assert len({s[0] for s in shapes}) >= 3 and len({s[2:] for s in shapes}) >= 3  # dynamic batch and size
    logging.getLogger(__name__).info("parity over %d batches: %s", len(shapes), totals)
    assert all(t["detections"] > 100 for t in totals.values())


@pytest.mark.slow
def test_the_files_carry_what_a_deployment_needs(exported):
    module, run_cfg, files, _ = exported
    for fmt, path in files.items():
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        embedded = ExportedModel(path).metadata
        assert sidecar == embedded
        assert sidecar["format"] == fmt
        assert sidecar["class_names"] == list(module.class_names)
        assert sidecar["label_to_cat_id"] == list(module.label_to_cat_id)
        assert sidecar["preprocess"]["size_divisor"] == run_cfg.data.size_divisor
        assert sidecar["postprocess"]["score_thresh"] == pytest.approx(module.net.postprocessor.score_thresh)
    assert files["onnx"].suffix == ".onnx" and files["torchscript"].name.endswith(".torchscript.pt")
    import onnx

    graph = onnx.load(str(files["onnx"])).graph
    assert "NonMaxSuppression" in {node.op_type for node in graph.node}  # NMS inside the model
    assert [i.name for i in graph.input] == ["images", "image_sizes"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # N, H, W dynamic


def test_to_original_pixels_clips_divides_and_drops_empty_slots():
    boxes = np.zeros((2, 3, 4), dtype=np.float32)
    boxes[0, 0] = [-5, 10, 50, 30]  # reaches left of the image
    boxes[0, 1] = [20, 0, 130, 90]  # reaches into the padding (image 120 x 80)
    boxes[1, 0] = [4, 6, 8, 12]
    scores = np.array([[0.9, 0.5, 0.0], [0.7, 0.0, 0.0]], dtype=np.float32)
    labels = np.array([[3, 1, -1], [0, -1, -1]])
    out = to_original_pixels(boxes, scores, labels, [2, 1], [(80, 120), (40, 60)], [(0.5, 0.25), (2.0, 2.0)])
    assert len(out) == 2 and [len(o["scores"]) for o in out] == [2, 1]
    np.testing.assert_allclose(out[0]["boxes"], [[0, 40, 100, 120], [40, 0, 240, 320]])
    np.testing.assert_allclose(out[1]["boxes"], [[2, 3, 4, 6]])
    np.testing.assert_array_equal(out[0]["labels"], [3, 1])
    np.testing.assert_allclose(out[1]["scores"], [0.7])
    same = to_original_pixels(torch.from_numpy(boxes), scores, labels, torch.tensor([2, 1]), [(80, 120), (40, 60)])
    np.testing.assert_allclose(same[0]["boxes"], [[0, 10, 50, 30], [20, 0, 120, 80]])  # no scale: input pixels
    with pytest.raises(ValueError, match="2 images of detections but 1 image sizes"):
        to_original_pixels(boxes, scores, labels, [2, 1], [(80, 120)])


def test_detect_matches_the_eager_post_processing_on_hand_made_head_outputs():
    """Ties, a level smaller than top-k, boxes into the padding and two images: the tensor-only
    post-processing in its graph form (scripted, as exported) keeps PyTorch's eager detections."""
    gen = torch.Generator().manual_seed(0)
    strides = [8, 16, 32, 64, 128]
    level_sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    features = [torch.zeros(2, 1, h, w) for h, w in level_sizes]
    p = sum(h * w for h, w in level_sizes)
    cls = torch.randn(2, p, 3, generator=gen) * 2
    cls[1, :20] = 1.5  # equal scores
    reg = torch.rand(2, p, 4, generator=gen) * 3
    sizes = torch.tensor([[64, 96], [50, 70]])
    from sapd.models.postprocess import postprocess_detections

    for topk, thresh, max_det in ((50, 0.3, 100), (1000, 0.05, 20), (5, 0.0, 7)):
        ref = postprocess_detections(
            cls,
            reg,
            level_sizes,
            strides,
            sizes.tolist(),
            score_thresh=thresh,
            pre_nms_topk=topk,
            max_detections=max_det,
        )
        out = sapd_export.scripted_detect()(cls, reg, features, sizes, strides, 4.0, thresh, topk, 0.5, max_det)
        assert out[0].shape == (2, max_det, 4)
        stats = match_detections(
            [{k: v.numpy() for k, v in r.items()} for r in ref], to_original_pixels(*out, sizes.tolist())
        )
        assert parity_ok(stats) and stats["max_abs_box"] == 0 and stats["detections"] > 0, (topk, stats)


def test_bfp_pooling_rewrite_is_exact_on_multiples_of_128(tmp_path):
    cfg = compose_config("train", [*TINY, "model.neck.bfp=true"], tmp_path)
    net = instantiate(cfg.model, num_classes=8).eval()
    rewritten = sapd_export.onnx_ready(net, 128)
    assert rewritten.neck.bfp.fixed_ratio  # the neck's export form
    assert not net.neck.bfp.fixed_ratio  # the caller's net untouched
    for h, w in ((128, 128), (256, 384)):  # P7 of 1 x 1, and levels of unequal sides
        images = torch.randn(1, 3, h, w)
        with torch.no_grad():
            a, b = net(images)["features"], rewritten(images)["features"]
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ExportError, match="BFP.*multiple of 128.*multiples of 32: use format=torchscript"):
        sapd_export.onnx_ready(net, 32)


def test_fcos_is_refused_with_one_line(tmp_path):
    from sapd.models import FPN, FCOSDetector, TimmBackbone

    backbone = TimmBackbone(name="resnet10t", pretrained=False, frozen_stages=-1, norm_eval=False)
    neck = FPN(in_channels=list(backbone.out_channels), out_channels=64)
    net = FCOSDetector(num_classes=3, backbone=backbone, neck=neck, num_convs=1)
    for fmt in ("onnx", "torchscript"):
        writer = getattr(sapd_export, f"export_{fmt}")
        with pytest.raises(ExportError, match="only SAPD checkpoints can be exported, not FCOSDetector") as err:
            writer(net, tmp_path / f"m.{fmt}", size_divisor=32)
        assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path, caplog):
    for overrides, message in (
        ([f"ckpt_path={tmp_path / 'model.ckpt'}", "format=tflite"], "format must be one of onnx, torchscript"),
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "checkpoint not found"),
        ([], "give the checkpoint to export"),
        ([f"ckpt_path={tmp_path / 'model.ckpt'}", "format=torchscript", "opset=18"], "opset applies to format=onnx"),
    ):
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            sapd_export.main(export_config(*overrides, f"output={tmp_path / 'out' / 'm.onnx'}"))
        assert exit_info.value.code == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("sapd.export: ") and message in errors[0], errors
        assert "\n" not in errors[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        load_module(tmp_path / "nope.ckpt")
    with pytest.raises(ExportError, match="opset must be 18 to 23"):
        sapd_export.export_onnx(torch.nn.Identity(), tmp_path / "m.onnx", size_divisor=32, opset=11)


@pytest.mark.slow
def test_export_benchmark_quick_run(tmp_path, capsys):
    if str(ROOT) not in sys.path:  # benchmarks/ sits beside src/, outside the installed package
        sys.path.insert(0, str(ROOT))
    """The benchmark's plumbing with TorchScript only: the ONNX file and ONNX Runtime are the export
    tests' (an ONNX export costs ~13 s, the same for any model)."""
    from benchmarks import __main__ as entry
    from benchmarks.export import ExportBenchConfig

    out = tmp_path / "export.json"
    res = entry.main(["suite=export", "quick=true", "threads=1", "runtimes=[torchscript]", f"out={out}"])
    tiny = res["models"]["tiny"]
    assert set(res["models"]) == {"tiny"} and tiny["padded"] == [128, 192]
    assert set(tiny["ms_per_image"]) == {"pytorch", "torchscript"}  # the reference always runs
    assert all(ms > 0 and np.isfinite(ms) for ms in tiny["ms_per_image"].values())
    assert parity_ok(tiny["parity"]["torchscript"]) and tiny["parity"]["torchscript"]["detections"] > 0  # post=cap
    assert set(tiny["export_s"]) == {"torchscript"} and tiny["export_s"]["torchscript"] > 0
    saved = json.loads(out.read_text())
    assert saved["models"]["tiny"]["ms_per_image"] == pytest.approx(tiny["ms_per_image"])
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 128x192 (128x192) | torchscript |" in table and table in capsys.readouterr().out
    assert "onnxruntime" not in table
    with pytest.raises(ValueError, match="runtimes must be among pytorch, torchscript, onnxruntime; got tvm"):
        ExportBenchConfig(runtimes=("tvm",))


PLAIN_LOAD = """
import sys, torch
{imports}
model = torch.jit.load(sys.argv[1])
boxes, scores, labels, count = model(torch.randn(1, 3, 128, 192), torch.tensor([[120, 190]]))
assert boxes.shape[0] == 1 and "sapd" not in sys.modules
print("ran", int(count[0]))
"""


@pytest.mark.slow
def test_torchscript_loads_in_a_process_without_sapd_after_import_torchvision(exported):
    """What docs/export.md tells a deployment: ``import torch, torchvision`` then ``torch.jit.load``."""
    _, _, files, _ = exported
    path = str(files["torchscript"])
    loaded = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD.format(imports="import torchvision"), path], capture_output=True, text=True
    )
    assert loaded.returncode == 0 and loaded.stdout.startswith("ran "), loaded.stderr[-2000:]
    without = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD.format(imports=""), path], capture_output=True, text=True
    )
    assert without.returncode != 0 and "torchvision::nms" in without.stderr  # why the docs name the import
    guide = (ROOT / "docs" / "export.md").read_text()
    assert "`import torch, torchvision` then `torch.jit.load(path)`" in guide
