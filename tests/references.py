"""Literal, slow references of vectorised model code, which only the tests use."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

from sapd.models.anchor_points import _inside_rule, shrink_boxes
from sapd.models.selection import FeatureSelectionNet


def inside_valid_box(points: Tensor, point_strides: Tensor, boxes: Tensor, epsilon: float = 0.2) -> Tensor:
    """Dense "p inside B_v" test (docs/design.md §3), O(P M) memory: the reference of
    :func:`sapd.models.anchor_points.candidate_pairs`.

    Args:
        points (FloatTensor[P, 2]), point_strides (FloatTensor[P]): from ``anchor_points``.
        boxes (FloatTensor[M, 4]): x1, y1, x2, y2.
    Returns:
        BoolTensor[P, M]: True where point p is inside B_v of box m.
    """
    valid = shrink_boxes(boxes, epsilon)
    return _inside_rule(points[:, None, :], point_strides[:, None], boxes[None], valid[None])  # [P, M]


def selection_forward_concat(
    net: FeatureSelectionNet, features: Sequence[Tensor], boxes: Tensor, box_images: Tensor, strides: Sequence[int]
) -> Tensor:
    """:meth:`FeatureSelectionNet.forward` written literally as Table 1 (RoI features concatenated)."""
    rois = torch.cat([box_images[:, None].to(boxes.dtype), boxes], dim=1)  # [M, 5]
    pooled = [
        roi_align(f, rois.to(f.dtype), net.roi_size, spatial_scale=1.0 / s, sampling_ratio=-1, aligned=True)
        for f, s in zip(features, strides)
    ]  # L x [M, C, 7, 7]
    x = net.convs(torch.cat(pooled, dim=1))  # [M, L*C, 7, 7] -> [M, channels, 1, 1]
    return net.fc(x.flatten(1))  # [M, L]
