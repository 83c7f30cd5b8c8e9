"""The check of an exported file against eager PyTorch: both run on random batches, their detections are
paired image by image (:func:`match_detections`), and :func:`parity_ok` says whether the promise holds:
every detection paired, boxes within 1e-3 relative, scores within 1e-4.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sapd.export.graph import export_onnx, export_torchscript, inference_copy, reason
from sapd.export.runtime import ExportedModel, ExportError, to_original_pixels

log = logging.getLogger(__name__)

# Parity of an exported model with PyTorch on CPU (tests/test_export.py, and the check after export).
BOX_RTOL, BOX_ATOL, SCORE_ATOL = 1e-3, 1e-3, 1e-4
# When the exported threshold keeps no detection of the check's random batches (a weak model's scores sit
# near the 0.01 prior), the check runs a copy exported at the score of this quantile of the batches'
# (point, class) pairs instead: tens of detections per image, so that it compares something.
CHECK_QUANTILE = 0.97


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
            raise ExportError(f"the exported {path} fails on {n} image(s) of {h}x{w}: {reason(exc)}") from None
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
        ref_net.postprocessor = ref_net.postprocessor.replace(score_thresh=lowered)  # on its own copy
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
