"""Per-class COCO numbers of one evaluation (AP, AP50, AP75, the PR curve at IoU 0.5), read from COCOeval's
accumulated precision array without evaluating each class again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClassMetrics:
    """Per-class COCO numbers of one evaluation, over all K classes of the data set.

    Attributes:
        ap, ap50, ap75 (FloatTensor[K]): AP at IoU 0.50:0.95, 0.50 and 0.75; NaN for a class
            without ground truth (COCO leaves it out of every mean).
        num_gt (LongTensor[K]): non-crowd ground-truth boxes of each class.
        precision50 (FloatTensor[R, K]): COCO's interpolated precision at IoU 0.5 at each recall
            threshold (non-increasing in recall; 0 beyond the class's largest recall; -1 for a class
            without ground truth).
        recall50 (FloatTensor[K]): the largest recall reached at IoU 0.5 (-1 without ground truth).
        rec_thresholds (FloatTensor[R]): the recall thresholds (COCO: 0, 0.01, ..., 1).
    """

    ap: Tensor
    ap50: Tensor
    ap75: Tensor
    num_gt: Tensor
    precision50: Tensor
    recall50: Tensor
    rec_thresholds: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.ap.numel())

    @property
    def has_gt(self) -> Tensor:
        """BoolTensor[K]: the classes COCO averages over."""
        return ~torch.isnan(self.ap)

    def mean_ap(self) -> float:
        """Mean of the per-class APs over the classes with ground truth: COCO's ``map``."""
        return float(self.ap[self.has_gt].double().mean()) if bool(self.has_gt.any()) else float("nan")


def _threshold_index(thresholds: Sequence[float] | Tensor, value: float) -> int | None:
    t = torch.as_tensor(thresholds, dtype=torch.float64)
    hit = torch.nonzero((t - value).abs() < 1e-6)
    return int(hit[0]) if len(hit) else None


def class_metrics_from_coco(
    precision: Tensor,
    recall: Tensor,
    classes: Tensor,
    *,
    iou_thresholds: Sequence[float],
    rec_thresholds: Sequence[float],
    num_gt: Tensor,
    num_classes: int | None = None,
) -> ClassMetrics:
    """Per-class AP and PR curves from COCOeval's accumulated arrays (no second evaluation).

    Args:
        precision (Tensor[T, R, C, A, M]): COCOeval ``eval['precision']`` (torchmetrics'
            ``extended_summary``): interpolated precision per IoU threshold, recall threshold, class,
            area range and max-detections setting; -1 where a class has no ground truth.
        recall (Tensor[T, C, A, M]): COCOeval ``eval['recall']``, the largest recall reached.
        classes (IntTensor[C]): the contiguous label of each of the C evaluated classes (those with
            detections or ground truth), in COCOeval's order.
        iou_thresholds, rec_thresholds: COCOeval's ``params.iouThrs`` and ``params.recThrs``.
        num_gt (LongTensor[K]): non-crowd ground-truth boxes per label.
        num_classes: K (default: ``len(num_gt)``).

    Area range "all" (index 0) and the largest max-detections setting (the last index) are used,
    as for COCO's headline AP.
    """
    idx = torch.as_tensor(classes).long().reshape(-1).cpu()  # torchmetrics gives a 0-d tensor for one class
    k = int(num_classes if num_classes is not None else num_gt.numel())
    k = max(k, int(idx.max()) + 1 if idx.numel() else 0)  # a label seen in detections only counts too
    prec = precision[:, :, :, 0, -1].double()  # [T, R, C]
    rec = recall[:, :, 0, -1].double()  # [T, C]
    valid = (prec > -1).all(dim=1).all(dim=0)  # [C]: a class with ground truth has every entry >= 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def per_class(values: Tensor) -> Tensor:  # [C] -> [K], NaN for no ground truth
        full = torch.full((k,), float("nan"), dtype=torch.float64)
        full[idx] = torch.where(valid, values, nan)
        return full.float()

    ap = per_class(prec.clamp(min=0).mean(dim=(0, 1)))
    t50, t75 = _threshold_index(iou_thresholds, 0.5), _threshold_index(iou_thresholds, 0.75)
    ap50 = per_class(prec[t50].clamp(min=0).mean(dim=0)) if t50 is not None else torch.full((k,), float("nan"))
    ap75 = per_class(prec[t75].clamp(min=0).mean(dim=0)) if t75 is not None else torch.full((k,), float("nan"))
    r = len(rec_thresholds)
    precision50 = torch.full((r, k), -1.0, dtype=torch.float64)
    recall50 = torch.full((k,), -1.0, dtype=torch.float64)
    if t50 is not None:
        precision50[:, idx] = torch.where(valid, prec[t50], -1.0)
        recall50[idx] = torch.where(valid, rec[t50], -1.0)
    counts = torch.zeros(k, dtype=torch.long)
    counts[: min(k, num_gt.numel())] = num_gt[:k].long().cpu()
    return ClassMetrics(
        ap=ap,
        ap50=ap50,
        ap75=ap75,
        num_gt=counts,
        precision50=precision50.float(),
        recall50=recall50.float(),
        rec_thresholds=torch.as_tensor(rec_thresholds, dtype=torch.float32),
    )
