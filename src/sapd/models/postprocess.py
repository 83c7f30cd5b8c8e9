"""Inference post-processing (paper §3.4), as one readable pipeline per image:
threshold -> per-level top-k -> decode (reverse of Eq. 1) -> clip -> drop boxes without area -> class-aware NMS
-> keep N -> map to the original image's pixels. Pattern of torchvision ``detection/fcos.py`` postprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from sapd.models.anchor_points import anchor_points, decode


def has_area(boxes: Tensor) -> Tensor:
    """BoolTensor[...]: which boxes ``[..., 4]`` (x1, y1, x2, y2) have a width and a height. Clipping leaves
    a box wholly outside the image (or one decoded inside out) without them: never a detection."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


@torch.no_grad()
def postprocess_detections(
    cls_logits: Tensor,
    box_reg: Tensor,
    level_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    scale_factors: Sequence[tuple[float, float]] | None = None,
    *,
    z: float = 4.0,
    score_thresh: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_thresh: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """Detections of every image.

    Args:
        cls_logits (FloatTensor[N, P, K]), box_reg (FloatTensor[N, P, 4]): head outputs (P3 first).
        level_sizes: ``(H_l, W_l)`` per level; strides: ``s_l`` per level.
        image_sizes: ``(h, w)`` of each image before padding, in input pixels (boxes are clipped to it).
        scale_factors: ``(sx, sy)`` = input / original per image; boxes are divided by them. None: 1.
        score_thresh: keep (point, class) pairs with sigmoid score above it (0.05).
        pre_nms_topk: at most this many pairs per level (1000).
        nms_thresh: IoU of the class-aware NMS (0.5).
        max_detections: detections kept per image (100).

    Returns:
        list of N dicts: ``boxes`` FloatTensor[D, 4] (original pixels), ``scores`` FloatTensor[D],
        ``labels`` LongTensor[D], sorted by decreasing score.
    """
    num_images, _, num_classes = cls_logits.shape
    level_sizes = [tuple(int(v) for v in hw) for hw in level_sizes]
    box_reg = box_reg.float()  # decode in float32 (AMP heads give half precision)
    points, point_strides, _ = anchor_points(level_sizes, strides, device=cls_logits.device)
    counts = [h * w for h, w in level_sizes]
    results = []
    for i in range(num_images):
        boxes_all, scores_all, labels_all = [], [], []
        start = 0
        for n in counts:  # per level: threshold and top-k (§3.4)
            scores = torch.sigmoid(cls_logits[i, start : start + n]).flatten()  # [n*K]
            keep = torch.nonzero(scores > score_thresh).squeeze(1)
            scores = scores[keep]
            if scores.numel() > pre_nms_topk:
                scores, top = scores.topk(pre_nms_topk)
                keep = keep[top]
            idx = start + keep // num_classes  # point index
            boxes = decode(points[idx], point_strides[idx], box_reg[i, idx], z)  # reverse of Eq. 1
            boxes_all.append(boxes)
            scores_all.append(scores)
            labels_all.append(keep % num_classes)
            start += n
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        h, w = (int(v) for v in image_sizes[i])
        boxes = clip_boxes_to_image(boxes, (h, w))
        nonempty = has_area(boxes)
        boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]  # sorted by score
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if scale_factors is not None:
            sx, sy = (float(v) for v in scale_factors[i])
            boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
        results.append({"boxes": boxes, "scores": scores, "labels": labels})
    return results


@dataclass
class PostProcess:
    """The settings of post-processing (config node ``model.postprocess``) and the SAPD decoding with them.

    Args:
        score_thresh: keep (point, class) pairs with sigmoid score above it (0.05).
        pre_nms_topk: at most this many pairs per level before NMS (1000).
        nms_thresh: IoU of the class-aware NMS (0.5).
        max_detections: detections kept per image (100).
    """

    score_thresh: float = 0.05
    pre_nms_topk: int = 1000
    nms_thresh: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.score_thresh) < 1.0:
            raise ValueError(f"model.postprocess.score_thresh must be in [0, 1); got {self.score_thresh!r}")
        if not 0.0 < float(self.nms_thresh) <= 1.0:
            raise ValueError(f"model.postprocess.nms_thresh must be in (0, 1]; got {self.nms_thresh!r}")
        for key in ("pre_nms_topk", "max_detections"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"model.postprocess.{key} must be >= 1; got {getattr(self, key)!r}")

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
    ) -> list[dict[str, Tensor]]:
        """:func:`postprocess_detections` with these settings."""
        return postprocess_detections(
            cls_logits,
            box_reg,
            level_sizes,
            strides,
            image_sizes,
            scale_factors,
            z=z,
            score_thresh=self.score_thresh,
            pre_nms_topk=self.pre_nms_topk,
            nms_thresh=self.nms_thresh,
            max_detections=self.max_detections,
        )
