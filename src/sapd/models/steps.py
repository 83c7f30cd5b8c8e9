"""What the steps of :class:`sapd.models.criterion.SAPDCriterion` hand each other: the flattened batch
(:func:`flatten_batch`), the result of each step, and the :class:`Assignment` read by diagnostics.

Points of all images are indexed ``image * P + p`` (``[N * P]``) and instances of all images are
concatenated (``[M]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sapd.models.anchor_points import anchor_points


class Batch(NamedTuple):
    """The batch flattened: ``logits`` [N*P, K] and ``reg`` [N*P, 4] in float32,
    the instances of all images (``boxes`` [M, 4], ``labels`` [M], ``box_images`` [M]) and the points
    of one image (``points`` [P, 2], ``point_strides`` [P], ``point_levels`` [P])."""

    logits: Tensor
    reg: Tensor
    boxes: Tensor
    labels: Tensor
    box_images: Tensor
    points: Tensor
    point_strides: Tensor
    point_levels: Tensor
    level_sizes: list[tuple[int, int]]
    strides: Sequence[int]
    num_images: int
    num_points: int
    num_levels: int
    num_instances: int


class Owners(NamedTuple):
    """Step 1: ``owner`` [N*P] (instance index or -1) and the owned points: flat index ``idx`` [Q],
    ``instance`` [Q], ``level`` [Q], Eq. 1 target ``target`` [Q, 4]; ``level_losses`` [M, L] (+inf: not a
    candidate) and ``has_candidate`` [M]."""

    owner: Tensor
    idx: Tensor
    instance: Tensor
    level: Tensor
    target: Tensor
    level_losses: Tensor
    has_candidate: Tensor


class Selection(NamedTuple):
    """Step 2: the selection net's ``logits`` [M, L] (with gradient) and ``probs`` (None without a net),
    w_l^B ``level_weights`` [M, L], ``selected`` [M, L] and ``argmin`` [M] (-1: no candidate level)."""

    logits: Tensor | None
    probs: Tensor | None
    level_weights: Tensor
    selected: Tensor
    argmin: Tensor


class Positives(NamedTuple):
    """Step 3: the positive points (flat ``idx`` [Q+], ``instance``, ``level``, ``target`` [Q+, 4],
    ``weight`` w [Q+]), the weight of every point ``point_weights`` [N*P] (1 for negatives) and the
    ignored (point, class) elements ``ignore`` (flat ``p * K + k``, or None)."""

    idx: Tensor
    instance: Tensor
    level: Tensor
    target: Tensor
    weight: Tensor
    point_weights: Tensor
    ignore: Tensor | None


@dataclass(frozen=True)
class Assignment:
    """Who trains where in a batch, for diagnostics (all detached).

    Attributes:
        instance (LongTensor[Q+]): each positive point's instance, an index into the batch's
            concatenated boxes.
        level (LongTensor[Q+]): its pyramid level.
        weight (FloatTensor[Q+]): its w of Eq. 5.
        selection_probs (FloatTensor[M, L]): the selection net's level probabilities (zeros without a net).
    """

    instance: Tensor
    level: Tensor
    weight: Tensor
    selection_probs: Tensor


def flatten_batch(outputs: dict, targets: Sequence[dict], strides: Sequence[int]) -> Batch:
    """The batch as the steps read it (:class:`Batch`). Geometry and losses are float32 whatever the
    head's precision (AMP): pixel coordinates of 1333-px images do not fit half precision."""
    cls_logits, box_reg = outputs["cls_logits"], outputs["box_reg"]
    level_sizes = [tuple(int(v) for v in hw) for hw in outputs["level_sizes"]]
    num_images, _, num_classes = cls_logits.shape
    device, dtype = cls_logits.device, torch.float32
    boxes = torch.cat([t["boxes"].to(device=device, dtype=dtype).reshape(-1, 4) for t in targets])  # [M, 4]
    labels = torch.cat([t["labels"].to(device=device, dtype=torch.long).reshape(-1) for t in targets])  # [M]
    box_images = torch.repeat_interleave(
        torch.arange(num_images, device=device),
        torch.tensor([len(t["labels"]) for t in targets], device=device),
        output_size=boxes.shape[0],  # known on the host: no wait for the device
    )  # [M]
    points, point_strides, point_levels = anchor_points(level_sizes, strides, device=device, dtype=dtype)
    return Batch(
        logits=cls_logits.reshape(-1, num_classes).float(),  # [N*P, K]
        reg=box_reg.reshape(-1, 4).float(),  # [N*P, 4]
        boxes=boxes,
        labels=labels,
        box_images=box_images,
        points=points,
        point_strides=point_strides,
        point_levels=point_levels,
        level_sizes=level_sizes,
        strides=strides,
        num_images=num_images,
        num_points=points.shape[0],
        num_levels=len(level_sizes),
        num_instances=boxes.shape[0],
    )
