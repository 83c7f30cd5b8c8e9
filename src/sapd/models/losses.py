"""Per-element losses of SAPD (paper Eq. 2): the IoU / GIoU loss on distances and the batch's dense focal
sum (the elementwise focal loss is ``torchvision.ops.sigmoid_focal_loss``).

Both return unreduced losses; weighting (Eq. 5) and normalisation (Eq. 6) happen in
:mod:`sapd.models.criterion`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def iou_loss(pred: Tensor, target: Tensor, kind: str = "iou", eps: float = 1e-6) -> Tensor:
    """IoU loss ``-log(IoU)`` (UnitBox) or GIoU loss ``1 - GIoU`` of boxes given as distances
    from one shared anchor point, so the boxes need no decoding: ``(l, t, r, b)`` in any common unit.

    Args:
        pred (FloatTensor[R, 4]), target (FloatTensor[R, 4]): non-negative d_l, d_t, d_r, d_b.
        kind: ``"iou"`` or ``"giou"``.
    Returns:
        FloatTensor[R]: the loss per row; IoU clamped at ``eps`` before the log.
    """
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    area_p = (pl + pr) * (pt + pb)
    area_t = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)).clamp(min=0) * (
        torch.minimum(pt, tt) + torch.minimum(pb, tb)
    ).clamp(min=0)
    union = area_p + area_t - inter
    iou = inter / union.clamp(min=eps)
    if kind == "iou":
        return -torch.log(iou.clamp(min=eps))
    if kind == "giou":
        enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb))
        giou = iou - (enclose - union) / enclose.clamp(min=eps)
        return 1 - giou
    raise ValueError(f"unknown loc loss {kind!r}; expected 'iou' or 'giou'")


def _focal_terms(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Focal loss of ``logits`` against target 0 (negative term) and target 1 (positive term)."""
    p = torch.sigmoid(logits)
    p_pow = p.square() if gamma == 2 else p**gamma
    q_pow = (1 - p).square() if gamma == 2 else (1 - p) ** gamma
    neg = F.softplus(logits) * p_pow  # BCE(x, 0) = log(1 + e^x)
    pos = F.softplus(-logits) * q_pow  # BCE(x, 1) = log(1 + e^-x)
    if alpha >= 0:
        neg, pos = neg * (1 - alpha), pos * alpha
    return neg, pos


def dense_focal_loss(
    logits: Tensor,
    point_weights: Tensor,
    pos_points: Tensor,
    pos_labels: Tensor,
    ignore_elements: Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """``sum_{p, k} w_p * FL(logits[p, k], t[p, k])`` without building the dense target: every element is
    first scored as a negative, then the few positive elements are corrected and the ignored ones
    removed. Equal to ``(torchvision.ops.sigmoid_focal_loss(logits, t) * w[:, None] * keep).sum()`` (tested).

    Args:
        logits (FloatTensor[R, K]): class logits of all points.
        point_weights (FloatTensor[R]): w of each point (Eq. 5; 1 for negatives).
        pos_points (LongTensor[Q]), pos_labels (LongTensor[Q]): the positive (point, class) elements.
        ignore_elements (LongTensor[I] or None): flat indices ``p * K + k`` of elements with weight 0
            (no duplicates, none positive).
    Returns:
        scalar FloatTensor.
    """
    p = torch.sigmoid(logits)
    neg = F.softplus(logits) * (p.square() if gamma == 2 else p**gamma)  # [R, K] target-0 focal loss
    if alpha >= 0:
        neg = neg * (1 - alpha)
    total = (point_weights @ neg).sum()  # every element as a negative: sum_p w_p sum_k FL(x_pk, 0)
    if pos_points.numel():
        x = logits[pos_points, pos_labels]  # [Q]
        neg_q, pos_q = _focal_terms(x, alpha, gamma)
        total = total + (point_weights[pos_points] * (pos_q - neg_q)).sum()
    if ignore_elements is not None and ignore_elements.numel():
        num_classes = logits.shape[1]
        x = logits.reshape(-1)[ignore_elements]
        neg_i, _ = _focal_terms(x, alpha, gamma)
        total = total - (point_weights[ignore_elements // num_classes] * neg_i).sum()
    return total
