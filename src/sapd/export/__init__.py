"""Export a trained SAPD for deployment without the training stack:
``python -m sapd.export ckpt_path=PATH [format=onnx|torchscript] [output=FILE] [opset=N]`` (``conf/export.yaml``).

The exported model is the whole detector, post-processing included: the network (backbone, FPN, head;
the feature-selection net is a training-only part and is left out) followed by
:func:`sapd.models.postprocess.detect`, the same tensor-only post-processing that eager inference runs
(sigmoid, per-level top-k, score threshold, decoding from anchor points computed from the feature-map
sizes inside the graph, clipping, class-aware NMS, the best ``max_detections``). Both exporters carry it
faithfully, so no raw-head variant is offered. One idea a module:

- :mod:`sapd.export.graph`: the exportable module and the ONNX / TorchScript writers;
- :mod:`sapd.export.runtime`: running an exported file and mapping its outputs back (what a deployment copies);
- :mod:`sapd.export.check`: the parity check of a file against eager PyTorch;
- :mod:`sapd.export.cli`: the command (metadata, output paths, refusals).

Inputs: ``images`` FloatTensor[N, 3, H, W] (normalised with the ImageNet mean / std, zero-padded at the
bottom / right to multiples of the size divisor: :func:`sapd.data.transforms.preprocess_image` +
:func:`sapd.data.transforms.collate`) and ``image_sizes`` LongTensor[N, 2] ((h, w) of each image before
padding). Outputs, in the input (resized) image's pixels, sorted by decreasing score:
``boxes`` FloatTensor[N, D, 4] (x1, y1, x2, y2), ``scores`` FloatTensor[N, D], ``labels`` LongTensor[N, D]
(contiguous labels 0..K-1) and ``num_detections`` LongTensor[N], with ``D = model.postprocess.max_detections``;
slots from ``num_detections`` on hold zeros and label -1. :func:`to_original_pixels` maps them to the
original image (clip, divide by the resize scale) as per-image arrays. A JSON file beside the model
(``<output>.json``, also embedded in the file) holds what a deployment needs: the preprocessing (mean,
std, sizes, divisor), class names, COCO category ids and the post-processing settings.

Refused, with one line: FCOS checkpoints (``model=fcos``; their post-processing is torchvision's,
which loops over images and levels in Python), and ONNX for a model with BFP (``model.neck.bfp``)
whose size divisor is not a multiple of 128. BFP max-pools between level sizes adaptively, which ONNX
cannot express for sizes unknown at export time (the exporter silently bakes the example's sizes in);
with inputs in multiples of 128 (the COCO configs) every level is exactly half the one below and the
pooling is an ordinary fixed-kernel max pool, the neck's ``fixed_ratio`` form, which is exported
instead. TorchScript takes both.
"""

from sapd.export.check import (
    BOX_ATOL,
    BOX_RTOL,
    CHECK_QUANTILE,
    SCORE_ATOL,
    match_detections,
    parity_ok,
    reference_detections,
    verify,
)
from sapd.export.cli import FORMATS, check_output, default_output, export, export_metadata, main, metadata_path
from sapd.export.graph import (
    ONNX_OPSETS,
    ExportableSAPD,
    example_inputs,
    export_onnx,
    export_torchscript,
    has_bfp,
    inference_copy,
    onnx_ready,
    scripted_detect,
)
from sapd.export.runtime import INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES, ExportedModel, ExportError, to_original_pixels
from sapd.models.postprocess import detect

__all__ = [
    "BOX_ATOL",
    "BOX_RTOL",
    "CHECK_QUANTILE",
    "FORMATS",
    "INPUT_NAMES",
    "METADATA_KEY",
    "ONNX_OPSETS",
    "OUTPUT_NAMES",
    "SCORE_ATOL",
    "ExportError",
    "ExportableSAPD",
    "ExportedModel",
    "check_output",
    "default_output",
    "detect",
    "example_inputs",
    "export",
    "export_metadata",
    "export_onnx",
    "export_torchscript",
    "has_bfp",
    "inference_copy",
    "main",
    "match_detections",
    "metadata_path",
    "onnx_ready",
    "parity_ok",
    "reference_detections",
    "scripted_detect",
    "to_original_pixels",
    "verify",
]
