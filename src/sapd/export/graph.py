"""The exported graph: SAPD's network and :func:`sapd.models.postprocess.detect` (the post-processing that
eager inference runs too) in one ``forward(images, image_sizes)``, and the two writers.

- ONNX: ``torch.onnx.export(dynamo=True)`` (``torch.export`` + ONNX Script, torch's default exporter;
  the TorchScript-based one is deprecated) with dynamic batch, height and width (height and width
  declared as multiples of the run's ``data.size_divisor``). ``torchvision.ops.nms`` becomes ONNX
  ``NonMaxSuppression``, the score threshold ``NonZero``; deformable convolutions (``dcn``) become
  ``DeformConv`` (opset 19 and up).
- TorchScript: ``torch.jit.trace`` of the network with :func:`detect` compiled by ``torch.jit.script``
  (a scripted function keeps its data-dependent control flow and shapes inside a trace).

The model takes the images' sizes before padding as a second input, because the post-processing clips
boxes to the image before NMS: clipping to the padded frame instead would change NMS for boxes that reach
into the padding. BFP (``model.neck.bfp``) is exported in its fixed-ratio form
(:class:`sapd.models.neck.BalancedFeaturePyramid` ``fixed_ratio``), exact for inputs in multiples of 128.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from sapd.atomic import replacing, write_bytes
from sapd.export.runtime import INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES, ExportError
from sapd.models.detector import SAPD
from sapd.models.postprocess import detect

ONNX_OPSETS = (18, 23)  # what torch's ONNX exporter writes natively (18 = its lowest, 20 = its default)


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
        self._detect = scripted_detect() if script else detect

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``images`` FloatTensor[N, 3, H, W], ``image_sizes`` LongTensor[N, 2] -> the outputs (package doc)."""
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
def scripted_detect():
    """:func:`detect` compiled by ``torch.jit.script``: its graph form (NMS of a batch in one call), as exported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the TorchScript path
        return torch.jit.script(detect)


def inference_copy(net: nn.Module) -> nn.Module:
    """A float32, contiguous-format, eval-mode copy of ``net`` (the caller's module is left as it was)."""
    if not isinstance(net, SAPD):
        ExportableSAPD(net)  # raises the one-line refusal
    return copy.deepcopy(net).float().to(memory_format=torch.contiguous_format).eval()


def has_bfp(net: nn.Module) -> bool:
    """Whether the neck ends in a Balanced Feature Pyramid (adaptive max pooling between level sizes)."""
    return getattr(getattr(net, "neck", None), "bfp", None) is not None


def onnx_ready(net: nn.Module, size_divisor: int) -> nn.Module:
    """The prepared copy of ``net`` with BFP's pooling in its fixed-ratio form (refused where not exact)."""
    net = inference_copy(net)
    if has_bfp(net):
        coarsest = max(int(s) for s in net.strides)
        if size_divisor % coarsest:
            raise ExportError(
                f"BFP's adaptive max pooling has an ONNX form only when the size divisor is a multiple of {coarsest} "
                f"(every level exactly half the one below); this run pads to multiples of {size_divisor}: "
                "use format=torchscript"
            )
        net.neck.bfp.fixed_ratio = True
    return net


def example_inputs(size_divisor: int, *, batch: int = 2) -> tuple[Tensor, Tensor]:
    """A traced example: ``batch`` images of 4 x 6 size divisors (no dimension of size 0 or 1, which
    ``torch.export`` would specialise), the second image smaller than the padded frame."""
    h, w = 4 * size_divisor, 6 * size_divisor
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    small = [h - size_divisor // 2, w - size_divisor]
    sizes = torch.tensor([[h, w]] + [small for _ in range(batch - 1)])
    return images, sizes


def reason(exc: BaseException) -> str:
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
    stride (128; :func:`onnx_ready`).
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

    model = ExportableSAPD(onnx_ready(net, size_divisor)).eval()
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
        raise ExportError(f"torch.onnx.export failed ({reason(exc)}); format=torchscript may work") from None
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
        raise ExportError(f"torch.jit.trace failed ({reason(exc)})") from None
    return write_bytes(path, buffer.getvalue())
