"""Export a trained SAPD for deployment without the training stack:
``python -m sapd.export ckpt_path=PATH [format=onnx|torchscript] [output=FILE] [opset=N]`` (``conf/export.yaml``).

What is exported, and why. The exported model is the whole detector, post-processing included: the
network (backbone, FPN, head; the feature-selection net is a training-only part and is left out)
followed by :func:`detect`, a tensor-only rewrite of :func:`sapd.models.postprocess.postprocess_detections`
(sigmoid, score threshold, per-level top-k, decoding from anchor points computed from the feature-map
sizes inside the graph, clipping, class-aware NMS, the best ``max_detections``). Both exporters were
tried and both carry it faithfully, so no raw-head variant is offered:

- ONNX: ``torch.onnx.export(dynamo=True)`` (``torch.export`` + ONNX Script, torch's default exporter;
  the TorchScript-based one is deprecated) with dynamic batch, height and width (height and width
  declared as multiples of the run's ``data.size_divisor``). ``torchvision.ops.nms`` becomes ONNX
  ``NonMaxSuppression``, the score threshold ``NonZero``; deformable convolutions (``dcn``) become
  ``DeformConv`` (opset 19 and up).
- TorchScript: ``torch.jit.trace`` of the network with :func:`detect` compiled by ``torch.jit.script``
  (a scripted function keeps its data-dependent control flow and shapes inside a trace).

Choices that keep the exported detections equal to PyTorch's (``net.postprocess``):

- The model takes the images' sizes before padding as a second input, because the project's
  post-processing clips boxes to the image before NMS: clipping to the padded frame instead would
  change NMS for boxes that reach into the padding.
- Per level, the top ``pre_nms_topk`` (point, class) pairs are taken first and the threshold is applied
  after (the same set as threshold-then-top-k, with a fixed k that needs no shape-dependent branch).
- Class-aware NMS of all images in one call: boxes are shifted by ``label * (max w + 1)`` in x and
  ``image * (max h + 1)`` in y so that different images and classes never overlap (torchvision's
  ``batched_nms`` shifts by ``label * (max coordinate + 1)`` along both axes).
- Outputs are padded to a fixed ``D = model.postprocess.max_detections`` per image.

Inputs: ``images`` FloatTensor[N, 3, H, W] (normalised with the ImageNet mean / std, zero-padded at the
bottom / right to multiples of the size divisor: :func:`sapd.data.transforms.preprocess_image` +
:func:`sapd.data.transforms.collate`) and ``image_sizes`` LongTensor[N, 2] ((h, w) of each image before
padding). Outputs, in the input (resized) image's pixels, sorted by decreasing score:
``boxes`` FloatTensor[N, D, 4] (x1, y1, x2, y2), ``scores`` FloatTensor[N, D], ``labels`` LongTensor[N, D]
(contiguous labels 0..K-1) and ``num_detections`` LongTensor[N]; slots from ``num_detections`` on hold
zeros and label -1. :func:`to_original_pixels` maps them to the original image (clip, divide by the
resize scale) as per-image arrays. A JSON file beside the model (``<output>.json``, also embedded in
the file) holds what a deployment needs: the preprocessing (mean, std, sizes, divisor), class names,
COCO category ids and the post-processing settings.

Refused, with one line: FCOS checkpoints (``model=fcos``; their post-processing is torchvision's,
which loops over images and levels in Python), and ONNX for a model with BFP (``model.neck.bfp``)
whose size divisor is not a multiple of 128. BFP max-pools between level sizes adaptively, which ONNX
cannot express for sizes unknown at export time (the exporter silently bakes the example's sizes in);
with inputs in multiples of 128 (the COCO configs) every level is exactly half the one below and the
pooling is an ordinary fixed-kernel max pool, which is exported instead. TorchScript takes both.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import logging
import tempfile
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, List, Tuple  # noqa: UP035 - TorchScript reads these annotations

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import nms

from sapd.app import hydra_app
from sapd.atomic import replacing, same_file, write_bytes, write_text
from sapd.checkpoint import load_module
from sapd.data import transforms
from sapd.errors import UserError, check_run_config
from sapd.logs import configure_logging
from sapd.models.detector import SAPD
from sapd.models.postprocess import has_area
from sapd.utils import set_threads

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
ONNX_OPSETS = (18, 23)  # what torch's ONNX exporter writes natively (18 = its lowest, 20 = its default)
METADATA_KEY = "sapd"  # ONNX metadata_props key / TorchScript extra file "sapd.json"
# Parity of an exported model with PyTorch on CPU (tests/test_export.py, and the check after export).
BOX_RTOL, BOX_ATOL, SCORE_ATOL = 1e-3, 1e-3, 1e-4
# When the exported threshold keeps no detection of the check's random batches (a weak model's scores sit
# near the 0.01 prior), the check runs a copy exported at the score of this quantile of the batches'
# (point, class) pairs instead: tens of detections per image, so that it compares something.
CHECK_QUANTILE = 0.97


class ExportError(UserError):
    """A request that cannot be exported (unknown format, FCOS, missing ONNX packages, bad opset)."""


# --------------------------------------------------------------------------- the exported computation


def detect(
    cls_logits: Tensor,
    box_reg: Tensor,
    features: List[Tensor],  # noqa: UP006
    image_sizes: Tensor,
    strides: List[int],  # noqa: UP006
    z: float,
    score_thresh: float,
    pre_nms_topk: int,
    nms_thresh: float,
    max_detections: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: UP006
    """Post-processing of a batch as fixed-size tensors (exportable; scriptable by ``torch.jit.script``).

    The same detections as :func:`sapd.models.postprocess.postprocess_detections` with ``image_sizes``
    and no scale factors (see the module docstring for the three equivalent rewrites).

    Args:
        cls_logits (FloatTensor[N, P, K]), box_reg (FloatTensor[N, P, 4]): head outputs, P3 first.
        features: the pyramid ``[P3..P7]`` (only their sizes are read: the anchor points' grid).
        image_sizes (LongTensor[N, 2]): (h, w) of each image before padding; boxes are clipped to it.
        strides: ``s_l`` per level; z: Eq. 1's normaliser; the rest: ``model.postprocess``.

    Returns:
        boxes FloatTensor[N, D, 4] (input pixels), scores FloatTensor[N, D], labels LongTensor[N, D],
        num_detections LongTensor[N], with D = ``max_detections``; sorted by decreasing score, empty
        slots zero (label -1).
    """
    n = cls_logits.shape[0]
    k = cls_logits.shape[2]
    box_reg = box_reg.float()
    all_scores: List[Tensor] = []  # noqa: UP006
    all_boxes: List[Tensor] = []  # noqa: UP006
    all_labels: List[Tensor] = []  # noqa: UP006
    start = 0
    for level, feature in enumerate(features):  # per level: top-k then threshold (§3.4)
        h = feature.shape[-2]
        w = feature.shape[-1]
        s = float(strides[level])
        hw = h * w
        scores = torch.sigmoid(cls_logits[:, start : start + hw].float()).reshape(n, hw * k)
        pad = torch.full((n, pre_nms_topk), -1.0, dtype=scores.dtype, device=scores.device)
        scores, idx = torch.cat([scores, pad], 1).topk(pre_nms_topk, dim=1)  # fixed k, any level size
        idx = idx.clamp(max=hw * k - 1)  # padding slots (score -1) point at a real pair; dropped below
        point = torch.div(idx, k, rounding_mode="floor")
        row = torch.div(point, w, rounding_mode="floor")
        col = point - row * w
        x = (col.to(scores.dtype) + 0.5) * s  # anchor point (§3.1)
        y = (row.to(scores.dtype) + 0.5) * s
        d = torch.gather(box_reg[:, start : start + hw], 1, point.unsqueeze(2).expand(n, pre_nms_topk, 4))
        d = d * (z * s)  # reverse of Eq. 1
        all_boxes.append(torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], dim=2))
        all_scores.append(scores)
        all_labels.append(idx - point * k)
        start = start + hw
    scores = torch.cat(all_scores, 1)  # [N, C]
    boxes = torch.cat(all_boxes, 1)  # [N, C, 4]
    labels = torch.cat(all_labels, 1)  # [N, C]
    c = scores.shape[1]
    sizes = image_sizes.to(boxes.dtype)
    hs = sizes[:, 0].reshape(n, 1)
    ws = sizes[:, 1].reshape(n, 1)
    boxes = torch.stack(  # clip to the image (before NMS, as the eager post-processing does)
        [
            torch.minimum(boxes[..., 0].clamp(min=0.0), ws),
            torch.minimum(boxes[..., 1].clamp(min=0.0), hs),
            torch.minimum(boxes[..., 2].clamp(min=0.0), ws),
            torch.minimum(boxes[..., 3].clamp(min=0.0), hs),
        ],
        dim=2,
    )
    flat_scores = scores.reshape(-1)
    # as the eager post-processing: a box left without width or height by clipping is no detection
    keep = torch.nonzero((flat_scores > score_thresh) & has_area(boxes).reshape(-1)).squeeze(1)
    # one NMS over all images and classes: each (image, class) is shifted to a region of its own
    image = torch.arange(n, device=boxes.device).reshape(n, 1).expand(n, c).reshape(-1)[keep]
    shift_x = labels.reshape(-1)[keep].to(boxes.dtype) * (sizes[:, 1].max() + 1.0)
    shift_y = image.to(boxes.dtype) * (sizes[:, 0].max() + 1.0)
    shift = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
    kept = keep[nms(boxes.reshape(-1, 4)[keep] + shift, flat_scores[keep], nms_thresh)]
    final = torch.full_like(flat_scores, -1.0).index_put((kept,), flat_scores[kept])
    empty = torch.full((n, max_detections), -1.0, dtype=final.dtype, device=final.device)
    top_scores, top = torch.cat([final.reshape(n, c), empty], 1).topk(max_detections, dim=1)
    valid = top_scores >= 0
    top = top.clamp(max=c - 1)
    out_boxes = torch.gather(boxes, 1, top.unsqueeze(2).expand(n, max_detections, 4))
    out_boxes = torch.where(valid.unsqueeze(2), out_boxes, torch.zeros_like(out_boxes))
    out_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
    out_labels = torch.where(valid, torch.gather(labels, 1, top), torch.full_like(top, -1))
    return out_boxes, out_scores, out_labels, valid.sum(1)


class ExportableSAPD(nn.Module):
    """What is exported: SAPD's network and :func:`detect` in one ``forward(images, image_sizes)``.

    Args:
        net: a trained :class:`sapd.models.SAPD` (its modules are shared, not copied).
        script: compile :func:`detect` with ``torch.jit.script`` (for ``torch.jit.trace``).
    """

    def __init__(self, net: nn.Module, *, script: bool = False):
        super().__init__()
        if not isinstance(net, SAPD):
            raise ExportError(
                f"only SAPD checkpoints can be exported, not {type(net).__name__} "
                "(FCOS post-processing is torchvision's, which loops over images and levels in Python)"
            )
        self.backbone, self.neck, self.head = net.backbone, net.neck, net.head
        self.strides = [int(s) for s in net.strides]
        self.z = float(net.z)
        post = net.postprocessor
        self.score_thresh = float(post.score_thresh)
        self.pre_nms_topk = int(post.pre_nms_topk)
        self.nms_thresh = float(post.nms_thresh)
        self.max_detections = int(post.max_detections)
        self._detect = _scripted_detect() if script else detect

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``images`` FloatTensor[N, 3, H, W], ``image_sizes`` LongTensor[N, 2] -> the outputs (module doc)."""
        features = self.neck(self.backbone(images))
        cls_logits, box_reg = self.head(features)
        return self._detect(
            cls_logits,
            box_reg,
            features,
            image_sizes,
            self.strides,
            self.z,
            self.score_thresh,
            self.pre_nms_topk,
            self.nms_thresh,
            self.max_detections,
        )


@functools.cache
def _scripted_detect():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the TorchScript path
        return torch.jit.script(detect)


# --------------------------------------------------------------------------- export


def inference_copy(net: nn.Module) -> nn.Module:
    """A float32, contiguous-format, eval-mode copy of ``net`` (the caller's module is left as it was)."""
    if not isinstance(net, SAPD):
        ExportableSAPD(net)  # raises the one-line refusal
    return copy.deepcopy(net).float().to(memory_format=torch.contiguous_format).eval()


def has_bfp(net: nn.Module) -> bool:
    """Whether the neck ends in a Balanced Feature Pyramid (adaptive max pooling between level sizes)."""
    return getattr(getattr(net, "neck", None), "bfp", None) is not None


def _bfp_forward_fixed_ratio(self: nn.Module, feats: Sequence[Tensor]) -> list[Tensor]:
    """:class:`sapd.models.neck.BalancedFeaturePyramid` ``forward`` with each ``adaptive_max_pool2d``
    written as ``max_pool2d`` of kernel = stride = the (exact) size ratio of the two levels.

    Equal whenever every level is exactly half the size of the one below (inputs a multiple of the
    coarsest stride): adaptive windows are then ``[i k, (i + 1) k)``. ONNX has no adaptive max pooling,
    and ``torch.onnx.export`` would bake the example's sizes into its decomposition.
    """
    r = self.refine_level
    size = feats[r].shape[-2:]
    gathered = [
        F.max_pool2d(f, 2 ** (r - i)) if i < r else F.interpolate(f, size=size, mode="nearest")
        for i, f in enumerate(feats)
    ]
    bsf = self.refine(torch.stack(gathered).mean(0))
    outs = []
    for i, f in enumerate(feats):
        if i < r:
            res = F.interpolate(bsf, size=f.shape[-2:], mode="nearest")
        else:
            res = F.max_pool2d(bsf, 2 ** (i - r)) if i > r else bsf
        outs.append(f + res)
    return outs


def _onnx_ready(net: nn.Module, size_divisor: int) -> nn.Module:
    """The prepared copy of ``net`` with BFP's pooling in fixed-ratio form (refused where not exact)."""
    net = inference_copy(net)
    if has_bfp(net):
        coarsest = max(int(s) for s in net.strides)
        if size_divisor % coarsest:
            raise ExportError(
                f"BFP's adaptive max pooling has an ONNX form only when the size divisor is a multiple of {coarsest} "
                f"(every level exactly half the one below); this run pads to multiples of {size_divisor}: "
                "use format=torchscript"
            )
        net.neck.bfp.forward = types.MethodType(_bfp_forward_fixed_ratio, net.neck.bfp)
    return net


def example_inputs(size_divisor: int, *, batch: int = 2) -> tuple[Tensor, Tensor]:
    """A traced example: ``batch`` images of 4 x 6 size divisors (no dimension of size 0 or 1, which
    ``torch.export`` would specialise), the second image smaller than the padded frame."""
    h, w = 4 * size_divisor, 6 * size_divisor
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    small = [h - size_divisor // 2, w - size_divisor]
    sizes = torch.tensor([[h, w]] + [small for _ in range(batch - 1)])
    return images, sizes


def _reason(exc: BaseException) -> str:
    """The innermost cause of an exporter's error, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def export_onnx(
    net: nn.Module, path: str | Path, *, size_divisor: int, opset: int | None = None, metadata: dict | None = None
) -> Path:
    """Writes ``net`` with post-processing as one ONNX file (weights inside): dynamic batch, and height
    and width any multiples of ``size_divisor``. ``metadata`` (JSON-able) is stored in the model's
    ``metadata_props["sapd"]``. A model with BFP needs a size divisor that is a multiple of its coarsest
    stride (128; :func:`_bfp_forward_fixed_ratio`).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"format=onnx needs the packages of the export extra ({err.name} is missing): pip install -e '.[export]'"
        ) from None
    if opset is not None and not ONNX_OPSETS[0] <= int(opset) <= ONNX_OPSETS[1]:
        low, high = ONNX_OPSETS
        raise ExportError(f"opset must be {low} to {high} (null: the exporter's default), got {opset}")
    from torch.export import Dim

    model = ExportableSAPD(_onnx_ready(net, size_divisor)).eval()
    example = example_inputs(size_divisor)
    batch = Dim("batch", min=1)
    spatial = {2: size_divisor * Dim("h", min=1), 3: size_divisor * Dim("w", min=1)}
    path = Path(path)
    try:
        with _quiet_exporter(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on unbacked sizes and deprecated APIs
            program = torch.onnx.export(
                model,
                example,
                dynamic_shapes=({0: batch, **spatial}, {0: batch}),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            program.model.metadata_props[METADATA_KEY] = json.dumps(metadata or {})
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types, with pages of text
        raise ExportError(f"torch.onnx.export failed ({_reason(exc)}); format=torchscript may work") from None
    with replacing(path) as tmp:  # whole or not at all: a kill or a full disk leaves the old file
        program.save(str(tmp), external_data=False)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter's own INFO / WARNING notes (graph rewrites, empty attribute lists) kept off the console."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_torchscript(net: nn.Module, path: str | Path, *, size_divisor: int, metadata: dict | None = None) -> Path:
    """Writes ``net`` with post-processing as a TorchScript file (``torch.jit.load``); dynamic N, H, W.

    ``metadata`` (JSON-able) is stored as the extra file ``sapd.json``."""
    model = ExportableSAPD(inference_copy(net), script=True).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example_inputs(size_divisor), check_trace=False)
            # into memory, then written by Python: a full disk is an OSError there, where torch's own
            # file writer aborts the process
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata or {})})
    except Exception as exc:  # noqa: BLE001 - tracing raises many types
        raise ExportError(f"torch.jit.trace failed ({_reason(exc)})") from None
    return write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- running and mapping back


class ExportedModel:
    """An exported file, run as ``model(images, image_sizes) -> (boxes, scores, labels, num_detections)``
    (NumPy arrays): ONNX Runtime on the CPU for ``.onnx``, ``torch.jit.load`` otherwise.

    Args:
        path: the exported file. threads: intra-op threads (None: the runtime's default).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"exported model not found: {self.path}")
        self.format = "onnx" if self.path.suffix == ".onnx" else "torchscript"
        if self.format == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise ExportError("running an ONNX model needs onnxruntime: pip install -e '.[export]'") from None
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self.metadata = json.loads(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        else:
            extra = {f"{METADATA_KEY}.json": ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
            self.metadata = json.loads(extra[f"{METADATA_KEY}.json"] or "{}")

    def __call__(self, images: Any, image_sizes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        image_sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
        if self.format == "onnx":
            return tuple(self.session.run(list(OUTPUT_NAMES), {"images": images, "image_sizes": image_sizes}))
        with torch.no_grad():
            out = self.module(torch.from_numpy(images), torch.from_numpy(image_sizes))
        return tuple(t.numpy() for t in out)


def to_original_pixels(
    boxes: Any,
    scores: Any,
    labels: Any,
    num_detections: Any,
    image_sizes: Sequence[Sequence[int]],
    scale_factors: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The exported model's padded outputs -> one dict per image in the ORIGINAL image's pixels.

    NumPy only (tensors are read with ``np.asarray``), so a deployment can copy it. Each image keeps its
    first ``num_detections`` slots; boxes are clipped to ``image_sizes`` (h, w before padding, in input
    pixels) and divided by ``scale_factors`` (sx, sy) = input / original, as
    :func:`sapd.data.transforms.preprocess_image` reports them (None: 1, boxes stay in input pixels).

    Returns:
        list of N dicts: ``boxes`` float32[D_i, 4] (x1, y1, x2, y2), ``scores`` float32[D_i], ``labels`` int64[D_i].
    """
    boxes, scores = np.asarray(boxes, dtype=np.float32), np.asarray(scores, dtype=np.float32)
    labels, counts = np.asarray(labels, dtype=np.int64), np.asarray(num_detections, dtype=np.int64).reshape(-1)
    if not len(image_sizes) == len(counts) == boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} images of detections but {len(image_sizes)} image sizes")
    out = []
    for i, m in enumerate(counts.tolist()):
        h, w = (float(v) for v in image_sizes[i])
        b = boxes[i, :m].copy()
        b[:, 0::2] = b[:, 0::2].clip(0, w)
        b[:, 1::2] = b[:, 1::2].clip(0, h)
        if scale_factors is not None:
            sx, sy = (float(v) for v in scale_factors[i])
            b /= np.array([sx, sy, sx, sy], dtype=np.float32)
        out.append({"boxes": b, "scores": scores[i, :m].copy(), "labels": labels[i, :m].copy()})
    return out


def match_detections(
    reference: Sequence[dict[str, Any]], exported: Sequence[dict[str, Any]], *, score_atol: float = SCORE_ATOL
) -> dict[str, float | int]:
    """How far an exported model's detections are from PyTorch's, image by image.

    Each reference detection (in decreasing score) is paired with the unpaired exported detection of the
    same label, score within ``score_atol``, and nearest box: equal scores (which arise where the
    network sees identical inputs, e.g. in the padding) may come out in either order.

    Returns:
        ``count_diff`` (sum of |count differences|), ``unmatched`` (reference detections without a
        partner), ``max_abs_box``, ``max_rel_box`` (|a - b| / max(|b|, 1)), ``max_abs_score`` over the pairs,
        and ``detections`` (how many reference detections there were).
    """
    stats: dict[str, float | int] = {
        "detections": 0,
        "count_diff": 0,
        "unmatched": 0,
        "max_abs_box": 0.0,
        "max_rel_box": 0.0,
        "max_abs_score": 0.0,
    }
    for ref, exp in zip(reference, exported, strict=True):
        rb, rs, rl = (np.asarray(ref[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
        eb, es, el = (np.asarray(exp[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
        stats["detections"] += len(rs)
        stats["count_diff"] += abs(len(rs) - len(es))
        free = np.ones(len(es), dtype=bool)
        for j in np.argsort(-rs, kind="stable"):
            cand = np.flatnonzero(free & (el == rl[j]) & (np.abs(es - rs[j]) <= score_atol))
            if cand.size == 0:
                stats["unmatched"] += 1
                continue
            dist = np.abs(eb[cand] - rb[j]).max(axis=1)
            best = cand[int(np.argmin(dist))]
            free[best] = False
            err = np.abs(eb[best] - rb[j])
            stats["max_abs_box"] = max(stats["max_abs_box"], float(err.max()))
            stats["max_rel_box"] = max(stats["max_rel_box"], float((err / np.maximum(np.abs(rb[j]), 1.0)).max()))
            stats["max_abs_score"] = max(stats["max_abs_score"], float(abs(es[best] - rs[j])))
    return stats


def parity_ok(stats: dict[str, float | int]) -> bool:
    """The parity this module promises: every detection paired, boxes within 1e-3 relative, scores within 1e-4;
    and some detections compared (none paired proves nothing)."""
    return (
        stats["detections"] > 0
        and stats["count_diff"] == 0
        and stats["unmatched"] == 0
        and stats["max_rel_box"] <= BOX_RTOL
        and stats["max_abs_score"] <= SCORE_ATOL
    )


@torch.no_grad()
def reference_detections(net: nn.Module, images: Tensor, image_sizes: Tensor) -> list[dict[str, np.ndarray]]:
    """PyTorch's detections of a padded batch, in input pixels (``net.postprocess`` without scale factors)."""
    outputs = net(images)
    dets = net.postprocess(outputs, [tuple(int(v) for v in s) for s in image_sizes.tolist()])
    return [{k: v.cpu().numpy() for k, v in d.items()} for d in dets]


# --------------------------------------------------------------------------- the command


def export_metadata(
    module: nn.Module,
    run_cfg: DictConfig,
    *,
    fmt: str,
    ckpt_path: str | Path,
) -> dict[str, Any]:
    """What a deployment needs beside the model: preprocessing, classes, post-processing, the inputs / outputs."""
    data = run_cfg.get("data", {})
    min_size, max_size = _eval_size(data)
    post = module.net.postprocessor
    return {
        "format": fmt,
        "checkpoint": str(ckpt_path),
        "torch": torch.__version__,
        "inputs": {
            "images": "float32[N, 3, H, W]: RGB / 255, minus mean, over std; zero-padded bottom / right to "
            "multiples of size_divisor",
            "image_sizes": "int64[N, 2]: (h, w) of each image before padding",
        },
        "outputs": {
            "boxes": "float32[N, D, 4]: x1, y1, x2, y2 in input (resized) pixels",
            "scores": "float32[N, D]",
            "labels": "int64[N, D]: 0..K-1, -1 in empty slots",
            "num_detections": "int64[N]",
        },
        "preprocess": {
            "mean": list(transforms.IMAGENET_MEAN),
            "std": list(transforms.IMAGENET_STD),
            "min_size": min_size,
            "max_size": max_size,
            "size_divisor": int(data.get("size_divisor", 128)),
        },
        "postprocess": {
            "score_thresh": float(post.score_thresh),
            "pre_nms_topk": int(post.pre_nms_topk),
            "nms_thresh": float(post.nms_thresh),
            "max_detections": int(post.max_detections),
        },
        "class_names": list(module.class_names or []),
        "label_to_cat_id": [int(v) for v in (module.label_to_cat_id or [])],
    }


def _eval_size(data_cfg: Any) -> tuple[int, int | None]:
    return transforms.eval_size(
        data_cfg.get("min_size", 800),
        data_cfg.get("max_size", 1333),
        data_cfg.get("val_min_size"),
        data_cfg.get("val_max_size"),
    )


def default_output(ckpt_path: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``<stem>.onnx`` / ``<stem>.torchscript.pt``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.stem + FORMATS[fmt])


def metadata_path(output: Path) -> Path:
    """The JSON written beside an exported file: ``<output>.json``."""
    return output.with_name(output.name + ".json")


def check_output(output: Path, ckpt_path: str | Path) -> None:
    """Refuses an output (or its ``<output>.json``) that is the checkpoint (links and ``..`` resolved)."""
    for target in (output, metadata_path(output)):
        if same_file(target, ckpt_path):
            raise ExportError(
                f"output={output} would replace the checkpoint {ckpt_path}: give another output=FILE "
                f"(or none: {default_output(ckpt_path, 'onnx').name} / {default_output(ckpt_path, 'torchscript').name})"
            )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Exports ``cfg.ckpt_path`` as ``cfg.format``; returns the paths written and, with ``verify``, the parity found."""
    fmt = str(cfg.get("format", "onnx")).lower()
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {cfg.get('format')!r}")
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ExportError("give the checkpoint to export: python -m sapd.export ckpt_path=PATH format=onnx")
    check_run_config(cfg)  # opset, num_threads, ...: one line before any work
    if fmt == "torchscript" and cfg.get("opset") is not None:
        raise ExportError("opset applies to format=onnx only")
    output = Path(cfg.output) if cfg.get("output") else default_output(cfg.ckpt_path, fmt)
    check_output(output, cfg.ckpt_path)
    set_threads(cfg.get("num_threads"))
    score_thresh = cfg.get("score_thresh")  # its range: sapd.checks.SETTINGS, checked at the start
    module, run_cfg = load_module(cfg.ckpt_path)
    net = module.net
    ExportableSAPD(net)  # refuses FCOS before any work
    if score_thresh is not None:  # baked into the graph (and written in the metadata)
        net.postprocessor.score_thresh = float(score_thresh)
    size_divisor = int(run_cfg.data.get("size_divisor", 128))
    meta = export_metadata(module, run_cfg, fmt=fmt, ckpt_path=cfg.ckpt_path)
    if fmt == "onnx":
        export_onnx(net, output, size_divisor=size_divisor, opset=cfg.get("opset"), metadata=meta)
    else:
        export_torchscript(net, output, size_divisor=size_divisor, metadata=meta)
    sidecar = metadata_path(output)
    write_text(sidecar, json.dumps(meta, indent=1) + "\n")
    result: dict[str, Any] = {"output": str(output), "metadata": str(sidecar)}
    if cfg.get("verify", True):
        result["parity"] = verify(net, output, size_divisor=size_divisor, fmt=fmt, opset=cfg.get("opset"))
    return result


def _check_batches(size_divisor: int) -> list[tuple[Tensor, Tensor]]:
    """The check's two random batches (1 and 3 images, sizes other than the traced example's)."""
    gen = torch.Generator().manual_seed(1)
    d = size_divisor
    batches = []
    for n, (h, w) in ((1, (3 * d, 5 * d)), (3, (5 * d, 3 * d))):
        images = torch.randn(n, 3, h, w, generator=gen)
        batches.append((images, torch.tensor([[h - d // 4 * i, w - d // 2 * i] for i in range(n)])))
    return batches


def _compare(ref_net: nn.Module, path: Path, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float | int]:
    model = ExportedModel(path)
    refs, exps = [], []
    for images, sizes in batches:
        refs += reference_detections(ref_net, images, sizes)
        try:
            outputs = model(images.numpy(), sizes.numpy())
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime and TorchScript raise their own types
            n, h, w = images.shape[0], images.shape[2], images.shape[3]
            raise ExportError(f"the exported {path} fails on {n} image(s) of {h}x{w}: {_reason(exc)}") from None
        exps += to_original_pixels(*outputs, sizes.tolist())
    return match_detections(refs, exps)


def verify(
    net: nn.Module, path: str | Path, *, size_divisor: int, fmt: str | None = None, opset: int | None = None
) -> dict[str, float | int]:
    """Runs the exported file and PyTorch on two random batches and returns :func:`match_detections` over
    them, with ``score_thresh``, the threshold they were compared at; logs a warning when parity fails
    (:func:`parity_ok`: also when no detection was compared), raises :class:`ExportError` when the file
    cannot run them.

    Where the exported threshold keeps no detection of the batches and ``fmt`` is given, a copy of the
    model is exported as ``fmt`` into a temporary folder at a threshold that keeps some
    (:data:`CHECK_QUANTILE` of the batches' scores) and checked instead: same graph, other constant.
    """
    ref_net = inference_copy(net)
    batches = _check_batches(size_divisor)
    threshold = float(ref_net.postprocessor.score_thresh)
    stats: dict[str, float | int] = _compare(ref_net, Path(path), batches)
    if stats["detections"] == 0 and fmt is not None:
        with torch.no_grad():
            scores = torch.cat([ref_net(images)["cls_logits"].sigmoid().flatten() for images, _ in batches])
        lowered = min(float(torch.quantile(scores.float(), CHECK_QUANTILE)), threshold)
        log.info(
            "the exported score threshold %g keeps no detection of the check's random batches: "
            "checking a copy exported at %.4g instead",
            threshold,
            lowered,
        )
        ref_net.postprocessor = dataclasses.replace(ref_net.postprocessor, score_thresh=lowered)
        with tempfile.TemporaryDirectory(prefix="sapd-export-check-") as tmp:
            copy_path = Path(tmp) / Path(path).name
            if fmt == "onnx":
                export_onnx(ref_net, copy_path, size_divisor=size_divisor, opset=opset)
            else:
                export_torchscript(ref_net, copy_path, size_divisor=size_divisor)
            stats = _compare(ref_net, copy_path, batches)
        threshold = lowered
    stats["score_thresh"] = threshold
    if stats["detections"] == 0:
        log.warning("the check against PyTorch compared no detection (score threshold %g): parity unknown", threshold)
    elif not parity_ok(stats):
        log.warning("exported detections differ from PyTorch's on a random batch: %s", stats)
    return stats


@hydra_app("sapd.export", "export")
def main(cfg: DictConfig) -> None:
    """Writes the model and its JSON; a bad request or checkpoint is one line on stderr, exit code 2."""
    configure_logging()
    result = export(cfg)
    log.info("wrote %s (and %s)", result["output"], result["metadata"])
    if "parity" in result:
        p = result["parity"]
        log.info(
            "check against PyTorch on random batches: %d detections (score >= %g), %d unpaired, max box diff %.2g px "
            "(relative %.2g), max score diff %.2g",
            p["detections"],
            p["score_thresh"],
            p["unmatched"] + p["count_diff"],
            p["max_abs_box"],
            p["max_rel_box"],
            p["max_abs_score"],
        )
    print(result["output"])


if __name__ == "__main__":
    main()
