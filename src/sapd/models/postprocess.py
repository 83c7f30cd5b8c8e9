"""Inference post-processing (paper §3.4), one tensor pipeline for a whole batch that eager inference, the
API and the exported graph (:mod:`sapd.export`) all run: per-level top-k -> decode (reverse of Eq. 1) ->
clip -> threshold, drop boxes without area -> class-aware NMS -> keep N; then, in eager use, one list entry
per image mapped to the original image's pixels. Pattern of torchvision ``detection/fcos.py`` postprocess.

:func:`detect` is written for export as well (``torch.jit.script`` compiles it; ``torch.onnx.export``
carries it), hence three rewrites of the textbook order that give the same detections:

- Per level, the top ``pre_nms_topk`` (point, class) pairs are taken first and the threshold is applied
  after (the same set as threshold-then-top-k, with a fixed k that needs no shape-dependent branch).
- Class-aware NMS of all images in one call when traced or exported: boxes are shifted by
  ``label * (max w + 1)`` in x and ``image * (max h + 1)`` in y so that different images and classes
  never overlap (torchvision's ``batched_nms`` shifts by ``label * (max coordinate + 1)`` along both
  axes). Eager use runs ``batched_nms`` image by image instead, which is faster there.
- Outputs are padded to a fixed ``D = max_detections`` per image, with ``num_detections`` per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, List, Tuple  # noqa: UP035 - TorchScript reads these annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from sapd.models.settings import PostProcessSettings


def has_area(boxes: Tensor) -> Tensor:
    """BoolTensor[...]: which boxes ``[..., 4]`` (x1, y1, x2, y2) have a width and a height. Clipping leaves
    a box wholly outside the image (or one decoded inside out) without them: never a detection."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


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
    """Detections of a batch as fixed-size tensors, in input pixels (exportable; scriptable).

    Args:
        cls_logits (FloatTensor[N, P, K]), box_reg (FloatTensor[N, P, 4]): head outputs, P3 first.
        features: one tensor per level whose last two sizes are ``(H_l, W_l)`` (only the sizes are read:
            the anchor points' grid, so that an exported graph keeps them dynamic).
        image_sizes (LongTensor[N, 2]): (h, w) of each image before padding; boxes are clipped to it.
        strides: ``s_l`` per level; z: Eq. 1's normaliser.
        score_thresh: keep (point, class) pairs with sigmoid score above it.
        pre_nms_topk: at most this many pairs per level; nms_thresh: IoU of the class-aware NMS;
        max_detections: detections kept per image (D).

    Returns:
        boxes FloatTensor[N, D, 4], scores FloatTensor[N, D], labels LongTensor[N, D],
        num_detections LongTensor[N]; sorted by decreasing score, empty slots zero (label -1).
    """
    n = cls_logits.shape[0]
    k = cls_logits.shape[2]
    box_reg = box_reg.float()  # decode in float32 (AMP heads give half precision)
    all_scores: List[Tensor] = []  # noqa: UP006
    all_boxes: List[Tensor] = []  # noqa: UP006
    all_labels: List[Tensor] = []  # noqa: UP006
    graph = True  # scripted, traced or exported: fixed shapes, no shape-dependent branch
    if not torch.jit.is_scripting():
        graph = torch.jit.is_tracing() or torch.compiler.is_exporting()
    start = 0
    for level, feature in enumerate(features):  # per level: top-k then threshold (§3.4)
        h = feature.shape[-2]
        w = feature.shape[-1]
        s = float(strides[level])
        hw = h * w
        scores = torch.sigmoid(cls_logits[:, start : start + hw].float()).reshape(n, hw * k)
        if graph or hw * k < pre_nms_topk:  # a fixed k at any level size (eager: only where it lacks pairs)
            pad = torch.full((n, pre_nms_topk), -1.0, dtype=scores.dtype, device=scores.device)
            scores = torch.cat([scores, pad], 1)
        scores, idx = scores.topk(pre_nms_topk, dim=1)
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
    boxes = torch.stack(  # clip to the image, before NMS
        [
            torch.minimum(boxes[..., 0].clamp(min=0.0), ws),
            torch.minimum(boxes[..., 1].clamp(min=0.0), hs),
            torch.minimum(boxes[..., 2].clamp(min=0.0), ws),
            torch.minimum(boxes[..., 3].clamp(min=0.0), hs),
        ],
        dim=2,
    )
    flat_scores = scores.reshape(-1)
    keep = torch.nonzero((flat_scores > score_thresh) & has_area(boxes).reshape(-1)).squeeze(1)
    if torch.jit.is_scripting():  # noqa: SIM114 - alone, so that TorchScript compiles this branch only
        kept = _nms_one_call(boxes, labels, flat_scores, keep, sizes, nms_thresh)
    elif graph:
        kept = _nms_one_call(boxes, labels, flat_scores, keep, sizes, nms_thresh)
    else:
        kept = _nms_per_image(boxes, labels, flat_scores, keep, nms_thresh)
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


def _nms_one_call(
    boxes: Tensor, labels: Tensor, scores: Tensor, keep: Tensor, sizes: Tensor, nms_thresh: float
) -> Tensor:
    """Class-aware NMS of all images in one ``nms`` (the graph form: no loop): each (image, class) is shifted
    to a region of its own, ``label * (max w + 1)`` in x and ``image * (max h + 1)`` in y. Indices into the
    flattened ``[N * C]`` candidates, of the kept ones among ``keep``."""
    n, c = boxes.shape[0], boxes.shape[1]
    image = torch.arange(n, device=boxes.device).reshape(n, 1).expand(n, c).reshape(-1)[keep]
    shift_x = labels.reshape(-1)[keep].to(boxes.dtype) * (sizes[:, 1].max() + 1.0)
    shift_y = image.to(boxes.dtype) * (sizes[:, 0].max() + 1.0)
    shift = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
    return keep[nms(boxes.reshape(-1, 4)[keep] + shift, scores[keep], nms_thresh)]


def _nms_per_image(boxes: Tensor, labels: Tensor, scores: Tensor, keep: Tensor, nms_thresh: float) -> Tensor:
    """:func:`_nms_one_call`'s result by torchvision's ``batched_nms`` image by image (eager use): it switches
    to one NMS per class where an image has many candidates, where one call over a batch is quadratic in
    all of the batch's candidates. The whole post-processing of 8 images of 800 x 1216, 80 classes, random
    head outputs (5000 candidates per image) took 8-10 s with one call and 0.8 s image by image, on a shared
    2-core CPU under load, 2026-12-05."""
    c = boxes.shape[1]
    image = torch.div(keep, c, rounding_mode="floor")
    flat_boxes, flat_labels = boxes.reshape(-1, 4), labels.reshape(-1)
    kept = [
        idx[batched_nms(flat_boxes[idx], scores[idx], flat_labels[idx], nms_thresh)]
        for idx in (keep[image == i] for i in range(boxes.shape[0]))
    ]
    return torch.cat(kept) if kept else keep


def to_original_pixels(boxes: Any, scale_factor: Sequence[float]) -> Any:
    """Boxes ``[..., 4]`` (x1, y1, x2, y2) in input pixels -> the original image's: x / sx, y / sy, with
    ``(sx, sy)`` = input / original as :func:`sapd.data.transforms.preprocess_image` reports it.

    Arithmetic and slicing only, so that it takes a torch tensor (eager inference, FCOS) and a NumPy
    array (the export runtime, :func:`sapd.export.to_original_pixels`) alike; returns a new one.
    """
    sx, sy = (float(v) for v in scale_factor)
    out = boxes / sx
    out[..., 1::2] = boxes[..., 1::2] / sy
    return out


def unpad(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor, scale_factors: Sequence | None = None
) -> list[dict[str, Tensor]]:
    """:func:`detect`'s padded outputs -> one dict per image (its first ``num_detections`` slots), boxes
    divided by ``scale_factors`` (sx, sy) per image when given."""
    results = []
    for i, m in enumerate(num_detections.tolist()):
        b = boxes[i, :m]
        if scale_factors is not None:
            b = to_original_pixels(b, scale_factors[i])
        results.append({"boxes": b, "scores": scores[i, :m], "labels": labels[i, :m]})
    return results


@dataclasses.dataclass(frozen=True)
class PostProcess(PostProcessSettings):
    """The SAPD decoding with the settings of post-processing (:class:`~sapd.models.settings.PostProcessSettings`,
    the config node ``model.postprocess``)."""

    def __call__(
        self,
        cls_logits: Tensor,
        box_reg: Tensor,
        level_sizes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
        scale_factors: Sequence[tuple[float, float]] | None = None,
        *,
        z: float = 4.0,
        score_thresh: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections of every image with these settings, per image in the original image's pixels.

        Args:
            cls_logits (FloatTensor[N, P, K]), box_reg (FloatTensor[N, P, 4]): head outputs (P3 first).
            level_sizes: ``(H_l, W_l)`` per level; strides: ``s_l`` per level; z: Eq. 1's normaliser.
            image_sizes: ``(h, w)`` of each image before padding, in input pixels (boxes are clipped to it).
            scale_factors: ``(sx, sy)`` = input / original per image; boxes are divided by them. None: 1.
            score_thresh: this call's threshold (None: ``self.score_thresh``).

        Returns:
            list of N dicts: ``boxes`` FloatTensor[D, 4] (original pixels), ``scores`` FloatTensor[D],
            ``labels`` LongTensor[D], sorted by decreasing score (:func:`detect`, then :func:`unpad`).
        """
        grid = cls_logits.new_zeros(())
        levels = [grid.expand(int(h), int(w)) for h, w in level_sizes]  # sizes only, no memory
        sizes = torch.tensor([[int(v) for v in hw] for hw in image_sizes], device=cls_logits.device).reshape(-1, 2)
        with torch.no_grad():
            out = detect(
                cls_logits,
                box_reg,
                levels,
                sizes,
                [int(s) for s in strides],
                float(z),
                self.thresh(score_thresh),
                int(self.pre_nms_topk),
                float(self.nms_thresh),
                int(self.max_detections),
            )
        return unpad(*out, scale_factors)


def postprocess_detections(*args: Any, z: float = 4.0, **settings: Any) -> list[dict[str, Tensor]]:
    """:class:`PostProcess` as a function: the arguments of its call (``cls_logits, box_reg, level_sizes,
    strides, image_sizes[, scale_factors]``, ``z``) and its settings as keywords (``score_thresh``,
    ``pre_nms_topk``, ``nms_thresh``, ``max_detections``; their defaults: 0.05, 1000, 0.5, 100)."""
    return PostProcess(**settings)(*args, z=z)
