"""Per-element losses of SAPD (SPEC §3, Eq. 2): sigmoid focal loss and the IoU / GIoU loss on distances.

Both return unreduced losses; weighting (Eq. 5) and normalisation (Eq. 6) happen in
:mod:`sapd.models.criterion`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), elementwise, as ``torchvision.ops.sigmoid_focal_loss``
    with ``reduction="none"`` (checked against it in the tests).

    Args:
        logits (FloatTensor[..., K]): raw class scores.
        targets (FloatTensor[..., K]): one-hot (or soft) targets in [0, 1].
    Returns:
        FloatTensor[..., K]: the loss of every (point, class).
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def iou_loss(pred: Tensor, target: Tensor, kind: str = "iou", eps: float = 1e-6) -> Tensor:
    """IoU loss ``-log(IoU)`` (UnitBox, SPEC §3) or GIoU loss ``1 - GIoU`` of boxes given as distances
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
