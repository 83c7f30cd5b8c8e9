"""Running an exported file and mapping its outputs back to the original image: what a deployment copies.

:class:`ExportedModel` runs a ``.onnx`` file with ONNX Runtime on the CPU, or a TorchScript file with
``torch.jit.load``; :func:`to_original_pixels` turns its padded outputs into one dict of NumPy arrays per
image, in the original image's pixels (with :func:`sapd.models.postprocess.to_original_pixels`, the
rescale that eager inference uses too).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapd.errors import UserError
from sapd.models.postprocess import to_original_pixels as rescale

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
METADATA_KEY = "sapd"  # ONNX metadata_props key / TorchScript extra file "sapd.json"


class ExportError(UserError):
    """A request that cannot be exported (unknown format, FCOS, missing ONNX packages, bad opset)."""


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

    Arrays in, NumPy out (tensors are read with ``np.asarray``). Each image keeps its first
    ``num_detections`` slots; boxes are clipped to ``image_sizes`` (h, w before padding, in input
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
            b = rescale(b, scale_factors[i])
        out.append({"boxes": b, "scores": scores[i, :m].copy(), "labels": labels[i, :m].copy()})
    return out
