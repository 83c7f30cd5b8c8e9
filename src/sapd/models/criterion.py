"""The SAPD training objective (paper §3.2-§3.3, Eq. 2-6; docs/design.md §2), batch-wide and vectorised.

Read top to bottom beside the paper:

1. ownership of every anchor point of every image (docs/design.md §3; :func:`assign_owners`);
2. per-point loss of each owned point, no gradient (focal summed over K + IoU; §3.3);
3. instance-dependent loss of each (instance, level) by scatter-add (:func:`instance_level_losses`);
4. level selection: phase 1 argmin, phase 2 top-k with detached selection probabilities (§3.3);
5. point weights w = w_l^B * f (Eq. 4, 5), 1 for negatives;
6. L = sum w L / max(sum_{p+} w, 1) + lambda L_select (Eq. 6), sums over the whole batch.

Three switches read the paper otherwise where its text leaves room (docs/design.md, "Switches"):
``valid_region`` (which points are inside B_v), ``soft_weight_norm`` (f relative to the instance's best
point on the level) and ``normaliser`` (the denominator of Eq. 6).

The batch is flattened: points of all images are indexed ``image * P + p`` (``[N * P]``), instances of
all images are concatenated (``[M_total]``), and levels are a per-point tensor, so nothing loops over
instances, points or levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sapd.models.anchor_points import (
    VALID_REGIONS,
    anchor_points,
    assign_owners,
    candidate_pairs,
    encode,
    soft_weight,
)
from sapd.models.losses import dense_focal_loss, iou_loss, sigmoid_focal_loss
from sapd.models.selection import instance_level_losses, select_levels


def level_max_normalised(f: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """f divided by the largest f of its (instance, level) ``group`` (``soft_weight_norm="level_max"``).

    Args:
        f (FloatTensor[Q]): soft weights of the owned points; group (LongTensor[Q]): ``m * L + l``.
    Returns:
        FloatTensor[Q]: in [0, 1], 1 at each group's best point; a group whose f are all 0 gets 1.
    """
    best = torch.zeros(num_groups, dtype=f.dtype, device=f.device).scatter_reduce_(0, group, f, reduce="amax")
    best = best[group]
    return torch.where(best > 0, f / best.clamp(min=torch.finfo(f.dtype).tiny), torch.ones_like(f))


@dataclass
class SAPDCriterion:
    """Configuration and computation of the SAPD loss; see the module docstring for the steps.

    The config node ``model.criterion``; the number of classes comes from the logits and the box
    coding's ``z`` (Eq. 1) from the detector, which shares it with the post-processing.

    Args:
        eta: exponent of f in Eq. 4 (>= 0).
        topk: levels per instance in phase 2 (Table 4; 1 to the number of levels).
        epsilon: shrink factor of B_v, in (0, 1].
        soft_weight: SW switch (off: f := 1).
        soft_select: SS switch (off: FSAF single level whatever the phase).
        unselected: ``"negative"`` (paper) or ``"ignore"`` (MMDetection FSAF: weight 0 in the owner's
            class only) for points owned by an instance not assigned to their level.
        ignore_epsilon: FSAF ignore region (0.5) or None (off).
        lambda_select: lambda of Eq. 6.
        loc_loss: ``"iou"`` or ``"giou"``.
        valid_region: ``"cell_overlap"`` (the FSAF authors' assigner) or ``"centre"`` (the point itself
            inside B_v, at least the nearest point on each level the instance has); see
            :func:`~sapd.models.anchor_points.candidate_pairs`.
        soft_weight_norm: ``"none"`` (Eq. 4 as printed) or ``"level_max"``: f divided by the largest f
            of the instance's points on that level, so its best point there weighs 1.
        normaliser: denominator of Eq. 6: ``"weight_sum"`` (the paper: sum of w over positives) or
            ``"num_pos"`` (the number of positive points, as FSAF / RetinaNet).
    """

    eta: float = 1.0
    topk: int = 3
    epsilon: float = 0.2
    soft_weight: bool = True
    soft_select: bool = True
    unselected: str = "negative"
    ignore_epsilon: float | None = None
    lambda_select: float = 0.1
    loc_loss: str = "iou"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    valid_region: str = "cell_overlap"
    soft_weight_norm: str = "none"
    normaliser: str = "weight_sum"

    def __post_init__(self) -> None:
        choices = {
            "unselected": ("negative", "ignore"),
            "valid_region": VALID_REGIONS,
            "soft_weight_norm": ("none", "level_max"),
            "normaliser": ("weight_sum", "num_pos"),
            "loc_loss": ("iou", "giou"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"model.criterion.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}"
                )
        ranges = {
            "eta": (float(self.eta) >= 0, ">= 0"),
            "topk": (int(self.topk) == self.topk and self.topk >= 1, "an integer >= 1"),
            "epsilon": (0 < float(self.epsilon) <= 1, "in (0, 1]"),
            "lambda_select": (float(self.lambda_select) >= 0, ">= 0"),
        }
        if self.ignore_epsilon is not None:
            ranges["ignore_epsilon"] = (float(self.epsilon) < float(self.ignore_epsilon) <= 1, "in (epsilon, 1]")
        for key, (ok, rule) in ranges.items():
            if not ok:
                raise ValueError(f"model.criterion.{key} must be {rule}; got {getattr(self, key)!r}")

    def check_levels(self, num_levels: int) -> None:
        """Raises ValueError when ``topk`` exceeds the pyramid's ``num_levels``."""
        if self.topk > num_levels:
            raise ValueError(
                f"model.criterion.topk={self.topk} exceeds the {num_levels} pyramid levels: choose 1 to {num_levels}"
            )

    def __call__(
        self,
        outputs: dict,
        targets: Sequence[dict],
        strides: Sequence[int],
        selection: nn.Module | None,
        phase: int,
        *,
        z: float = 4.0,
    ) -> dict[str, Tensor]:
        """Loss dict of docs/contracts.md, computed in float32 whatever autocast is in force.

        Every sum of the loss (the focal sums, whose negative part is a matrix product that autocast
        would run in half precision, the weight sums and Eq. 6's normaliser) runs with autocast off on
        float32 inputs; only the selection network runs under the caller's autocast, as any layer.
        See :meth:`_compute` for the arguments.
        """
        device_type = outputs["cls_logits"].device.type
        amp = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type=device_type, enabled=False):
            return self._compute(outputs, targets, strides, selection, phase, z=z, amp=amp)

    def _compute(
        self,
        outputs: dict,
        targets: Sequence[dict],
        strides: Sequence[int],
        selection: nn.Module | None,
        phase: int,
        *,
        z: float,
        amp: tuple[bool, torch.dtype],
    ) -> dict[str, Tensor]:
        """The loss with autocast off.

        Args:
            outputs: ``SAPD.forward`` output: ``cls_logits`` [N, P, K], ``box_reg`` [N, P, 4],
                ``features`` [P3..P7], ``level_sizes``.
            targets: per image ``boxes`` FloatTensor[M_i, 4] (input pixels), ``labels`` LongTensor[M_i].
            strides: s_l per level.
            selection: the feature-selection network (or None).
            phase: 1 (FSAF single level) or 2 (soft top-k).
            z: normalisation scalar of Eq. 1 (the detector's box coding).
            amp: the caller's autocast (enabled, dtype), restored around the selection network.
        """
        cls_logits, box_reg = outputs["cls_logits"], outputs["box_reg"]
        level_sizes = [tuple(int(v) for v in hw) for hw in outputs["level_sizes"]]
        num_images, num_points, num_classes = cls_logits.shape
        num_levels = len(level_sizes)
        # Geometry and losses in float32 whatever the head's precision (AMP): pixel coordinates of
        # 1333-px images do not fit half precision.
        device, dtype = cls_logits.device, torch.float32
        logits = cls_logits.reshape(-1, num_classes).float()  # [N*P, K]
        reg = box_reg.reshape(-1, 4).float()  # [N*P, 4]

        boxes = torch.cat([t["boxes"].to(device=device, dtype=dtype).reshape(-1, 4) for t in targets])  # [M, 4]
        labels = torch.cat([t["labels"].to(device=device, dtype=torch.long).reshape(-1) for t in targets])  # [M]
        num_inst = boxes.shape[0]
        box_images = torch.repeat_interleave(
            torch.arange(num_images, device=device),
            torch.tensor([len(t["labels"]) for t in targets], device=device),
            output_size=num_inst,  # known on the host: no wait for the device
        )  # [M]
        points, point_strides, point_levels = anchor_points(level_sizes, strides, device=device, dtype=dtype)

        with torch.no_grad():
            # 1. Owner of every point of every image (-1: none).
            owner = assign_owners(
                boxes, level_sizes, strides, self.epsilon, box_images, num_images, self.valid_region
            )  # [N*P]
            owned_idx = torch.nonzero(owner >= 0).squeeze(1)  # [Q] global point index
            own_m = owner[owned_idx]  # [Q]
            own_p = owned_idx % num_points  # [Q] point index within the image
            own_lvl = point_levels[own_p]
            own_d = encode(points[own_p], point_strides[own_p], boxes[own_m], z)  # [Q, 4] Eq. 1

            # 2. §3.3: per-point loss, unweighted, focal summed over classes + IoU.
            # (F.one_hot would read the labels' range back to the host to check it)
            own_onehot = (labels[own_m, None] == torch.arange(num_classes, device=device)).to(dtype)  # [Q, K]
            own_cls = sigmoid_focal_loss(logits[owned_idx], own_onehot, self.focal_alpha, self.focal_gamma)
            point_loss = own_cls.sum(1) + iou_loss(reg[owned_idx], own_d, self.loc_loss)  # [Q]

            # 3. instance-dependent loss per (instance, level), +inf where not a candidate.
            level_losses = instance_level_losses(point_loss, own_m, own_lvl, num_inst, num_levels)  # [M, L]
            has_candidate = torch.isfinite(level_losses).any(1)  # [M]

        # 4. §3.3: selection net (with gradient, trained from the start) and level assignment.
        if self.soft_select and phase == 2 and selection is None:
            raise ValueError("phase 2 soft level selection needs a feature-selection network (selection=None)")
        # The selection net runs whenever it exists, with no instance too (an empty RoI batch): every
        # parameter then takes part in every step on every process, so DDP's gradient all-reduce never
        # waits for a process whose batch holds no training box (find_unused_parameters stays off).
        run_selection = selection is not None
        probs = sel_logits = None
        if run_selection:
            with torch.autocast(device_type=device.type, dtype=amp[1], enabled=amp[0]):
                sel_logits = selection(outputs["features"], boxes, box_images, strides)  # [M, L]
            sel_logits = sel_logits.float()
            probs = sel_logits.softmax(-1)
        soft = self.soft_select and phase == 2 and probs is not None
        level_weights, selected, argmin = select_levels(level_losses, probs, soft=soft, topk=self.topk)

        with torch.no_grad():
            # 5. Eq. 4 / 5: weights of owned points on selected levels; the rest are negatives (w = 1).
            pos_mask = selected[own_m, own_lvl]  # [Q]
            f = soft_weight(own_d, self.eta) if self.soft_weight else torch.ones_like(point_loss)
            if self.soft_weight and self.soft_weight_norm == "level_max":
                f = level_max_normalised(f, own_m * num_levels + own_lvl, num_inst * num_levels)
            pos_w = level_weights[own_m, own_lvl] * f  # [Q]
            pos_q = torch.nonzero(pos_mask).squeeze(1)  # [Q+] one read of the count, then plain indexing
            pos_idx, pos_m, pos_d, pos_w = owned_idx[pos_q], own_m[pos_q], own_d[pos_q], pos_w[pos_q]
            weights = torch.ones(num_images * num_points, device=device, dtype=dtype)  # [N*P]
            weights[pos_idx] = pos_w
            ignore = []  # flat (point, class) elements with weight 0
            if self.unselected == "ignore":  # MMDetection FSAF ``reweight_loss_single``
                neg_idx, neg_m = owned_idx[~pos_mask], own_m[~pos_mask]
                ignore.append(neg_idx * num_classes + labels[neg_m])
            if self.ignore_epsilon is not None:  # FSAF ignore region, owner's class only
                ign_m, ign_p = candidate_pairs(boxes, level_sizes, strides, self.ignore_epsilon, box_images)
                not_pos = owner[ign_p] < 0
                ignore.append(ign_p[not_pos] * num_classes + labels[ign_m[not_pos]])
            ignore_elements = torch.cat(ignore).unique() if ignore else None

        # 6. Eq. 2 / 5 / 6: focal loss of every (point, class) and IoU loss of positives, each weighted by
        # w of its point, summed over the whole batch, one normaliser.
        normaliser = (pos_w.sum() if self.normaliser == "weight_sum" else pos_w.new_tensor(pos_w.numel())).clamp(min=1)
        cls_loss = dense_focal_loss(
            logits, weights, pos_idx, labels[pos_m], ignore_elements, self.focal_alpha, self.focal_gamma
        )
        loc_loss = (iou_loss(reg[pos_idx], pos_d, self.loc_loss) * pos_w).sum()
        cls_loss, loc_loss = cls_loss / normaliser, loc_loss / normaliser
        valid = has_candidate & (argmin >= 0)  # [M] instances with a target level
        num_valid = valid.sum()
        if run_selection:
            # the mean cross-entropy over the valid instances, as a masked sum (no host-side branch; 0,
            # with the graph kept, when there is none)
            ce = F.cross_entropy(sel_logits, argmin.clamp(min=0), reduction="none")  # [M]
            select_loss = torch.where(valid, ce, torch.zeros_like(ce)).sum() / num_valid.clamp(min=1)
        else:
            select_loss = logits.new_zeros(())
        total = cls_loss + loc_loss + self.lambda_select * select_loss

        out = {
            "cls": cls_loss,
            "loc": loc_loss,
            "select": select_loss,
            "total": total,
            "num_pos": torch.tensor(float(pos_idx.numel()), device=device),
            "pos_weight_sum": pos_w.sum().detach(),
            "num_unassigned": (~has_candidate).sum().to(dtype),
        }
        mean_w = (level_weights * valid[:, None]).sum(0) / num_valid.clamp(min=1)  # [L]; 0 with no valid instance
        for lvl in range(num_levels):
            out[f"sel_w/P{lvl + 3}"] = mean_w[lvl].detach()
        out["selection_probs"] = (
            probs.detach() if probs is not None else torch.zeros(num_inst, num_levels, device=device, dtype=dtype)
        )
        # Who trains where, for analysis (sapd.analysis): each positive point's instance (index into the
        # batch's concatenated boxes), level and weight w of Eq. 5. A dict, so no logger mistakes it for a metric.
        out["assignment"] = {"instance": pos_m, "level": own_lvl[pos_q], "weight": pos_w.detach()}
        return out
