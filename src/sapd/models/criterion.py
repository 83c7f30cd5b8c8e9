"""The SAPD training objective (paper §3.2-§3.3, Eq. 2-6; docs/design.md §2), batch-wide and vectorised.

:class:`SAPDCriterion` runs four named steps, each a method to read beside the paper:

1. :meth:`~SAPDCriterion.assign` - the owner of every anchor point of every image (docs/design.md §3;
   :func:`assign_owners`), the per-point loss of each owned point (focal summed over K + IoU, no
   gradient; §3.3) and the instance-dependent loss of each (instance, level) (:func:`instance_level_losses`);
2. :meth:`~SAPDCriterion.select` - the feature-selection net and the level assignment: phase 1 argmin,
   phase 2 top-k with detached selection probabilities (§3.3);
3. :meth:`~SAPDCriterion.weigh` - point weights w = w_l^B * f (Eq. 4, 5), 1 for negatives, and the
   ignored (point, class) elements;
4. :meth:`~SAPDCriterion.losses` - L = sum w L / max(sum_{p+} w, 1) + lambda L_select (Eq. 6), sums
   over the whole batch.

The loss dict holds scalars only. Who trains where (each positive point's instance, level and weight,
and the selection net's level probabilities) is an :class:`Assignment`: :meth:`SAPDCriterion.assignment`
computes it without the losses (sapd.analysis), and every call leaves the step's own in
:attr:`SAPDCriterion.last_assignment` (the training step's selection histogram).

Three switches read the paper otherwise where its text leaves room (docs/design.md, "Switches"):
``valid_region`` (which points are inside B_v), ``soft_weight_norm`` (f relative to the instance's best
point on the level) and ``normaliser`` (the denominator of Eq. 6).

The batch is flattened (:func:`sapd.models.steps.flatten_batch`): points of all images are indexed
``image * P + p`` (``[N * P]``), instances of all images are concatenated (``[M_total]``), and levels
are a per-point tensor, so nothing loops over instances, points or levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from sapd.models.anchor_points import assign_owners, candidate_pairs, encode, soft_weight
from sapd.models.losses import dense_focal_loss, iou_loss
from sapd.models.selection import instance_level_losses, select_levels
from sapd.models.settings import CriterionSettings
from sapd.models.steps import Assignment, Batch, Owners, Positives, Selection, flatten_batch


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


@dataclass(kw_only=True)
class SAPDCriterion(CriterionSettings):
    """The SAPD loss with its settings (:class:`~sapd.models.settings.CriterionSettings`, the config node
    ``model.criterion``, whose defaults are the paper's); see the module docstring for the steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # the assignment of the latest call (not a setting: no field, so neither compared nor replaced)
        self.last_assignment: Assignment | None = None

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
        """Loss dict of docs/contracts.md (scalars), computed in float32 whatever autocast is in force;
        the batch's :class:`Assignment` is left in :attr:`last_assignment`.

        Every sum of the loss (the focal sums, whose negative part is a matrix product that autocast
        would run in half precision, the weight sums and Eq. 6's normaliser) runs with autocast off on
        float32 inputs; only the selection network runs under the caller's autocast, as any layer.

        Args:
            outputs: ``SAPD.forward`` output: ``cls_logits`` [N, P, K], ``box_reg`` [N, P, 4],
                ``features`` [P3..P7], ``level_sizes``.
            targets: per image ``boxes`` FloatTensor[M_i, 4] (input pixels), ``labels`` LongTensor[M_i].
            strides: s_l per level.
            selection: the feature-selection network (or None).
            phase: 1 (FSAF single level) or 2 (soft top-k).
            z: normalisation scalar of Eq. 1 (the detector's box coding).
        """
        return self._run(outputs, targets, strides, selection, phase, z=z, with_losses=True)

    @torch.no_grad()
    def assignment(self, *args: Any, **kwargs: Any) -> Assignment:
        """The :class:`Assignment` of a batch (steps 1-3, no loss); the arguments as :meth:`__call__`."""
        self._run(*args, with_losses=False, **kwargs)
        return self.last_assignment

    def _run(self, outputs, targets, strides, selection, phase, *, z: float = 4.0, with_losses: bool) -> dict:
        device_type = outputs["cls_logits"].device.type
        amp = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type=device_type, enabled=False):
            batch = flatten_batch(outputs, targets, strides)
            owners = self.assign(batch, z)
            chosen = self.select(batch, owners, outputs["features"], selection, phase, amp)
            positives = self.weigh(batch, owners, chosen)
            self.last_assignment = self._diagnostics(batch, chosen, positives)
            return self.losses(batch, owners, chosen, positives) if with_losses else {}

    @torch.no_grad()
    def assign(self, batch: Batch, z: float) -> Owners:
        """Step 1: the owner of every point of every image (-1: none), and the instance-dependent loss of
        each (instance, level): the mean per-point loss, unweighted (focal summed over classes + IoU; §3.3)."""
        b = batch
        pairs = candidate_pairs(b.boxes, b.level_sizes, b.strides, self.epsilon, b.box_images, self.valid_region)
        owner = assign_owners(b.boxes, pairs, b.num_images * b.num_points)  # [N*P]
        idx = torch.nonzero(owner >= 0).squeeze(1)  # [Q] global point index
        instance = owner[idx]  # [Q]
        p = idx % b.num_points  # [Q] point index within the image
        level = b.point_levels[p]
        target = encode(b.points[p], b.point_strides[p], b.boxes[instance], z)  # [Q, 4] Eq. 1
        # (F.one_hot would read the labels' range back to the host to check it)
        num_classes = b.logits.shape[1]
        onehot = (b.labels[instance, None] == torch.arange(num_classes, device=idx.device)).to(b.logits.dtype)
        cls = sigmoid_focal_loss(b.logits[idx], onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        point_loss = cls.sum(1) + iou_loss(b.reg[idx], target, self.loc_loss)  # [Q]
        level_losses = instance_level_losses(point_loss, instance, level, b.num_instances, b.num_levels)  # [M, L]
        return Owners(owner, idx, instance, level, target, level_losses, torch.isfinite(level_losses).any(1))

    def select(
        self,
        batch: Batch,
        owners: Owners,
        features: Sequence[Tensor],
        selection: nn.Module | None,
        phase: int,
        amp: tuple[bool, torch.dtype],
    ) -> Selection:
        """Step 2 (§3.3): the selection net (with gradient, trained from the start, under the caller's
        autocast ``amp``) and the level assignment of each instance."""
        if self.soft_select and phase == 2 and selection is None:
            raise ValueError("phase 2 soft level selection needs a feature-selection network (selection=None)")
        # The selection net runs whenever it exists, with no instance too (an empty RoI batch): every
        # parameter then takes part in every step on every process, so DDP's gradient all-reduce never
        # waits for a process whose batch holds no training box (find_unused_parameters stays off).
        logits = probs = None
        if selection is not None:
            device_type = batch.logits.device.type
            with torch.autocast(device_type=device_type, dtype=amp[1], enabled=amp[0]):
                logits = selection(features, batch.boxes, batch.box_images, batch.strides)  # [M, L]
            logits = logits.float()
            probs = logits.softmax(-1)
        soft = self.soft_select and phase == 2 and probs is not None
        level_weights, selected, argmin = select_levels(owners.level_losses, probs, soft=soft, topk=self.topk)
        return Selection(logits, probs, level_weights, selected, argmin)

    @torch.no_grad()
    def weigh(self, batch: Batch, owners: Owners, chosen: Selection) -> Positives:
        """Step 3 (Eq. 4 / 5): the weight of each owned point on a selected level; every other point is a
        negative (w = 1), and some (point, class) elements are ignored (``unselected``, ``ignore_epsilon``)."""
        b, o = batch, owners
        num_classes = b.logits.shape[1]
        pos_mask = chosen.selected[o.instance, o.level]  # [Q]
        f = soft_weight(o.target, self.eta) if self.soft_weight else torch.ones_like(o.instance, dtype=b.logits.dtype)
        if self.soft_weight and self.soft_weight_norm == "level_max":
            f = level_max_normalised(f, o.instance * b.num_levels + o.level, b.num_instances * b.num_levels)
        weight = chosen.level_weights[o.instance, o.level] * f  # [Q]
        q = torch.nonzero(pos_mask).squeeze(1)  # [Q+] one read of the count, then plain indexing
        idx = o.idx[q]
        point_weights = torch.ones(b.logits.shape[0], device=idx.device, dtype=b.logits.dtype)  # [N*P]
        point_weights[idx] = weight[q]
        ignore = []  # flat (point, class) elements with weight 0
        if self.unselected == "ignore":  # MMDetection FSAF ``reweight_loss_single``
            neg_idx, neg_m = o.idx[~pos_mask], o.instance[~pos_mask]
            ignore.append(neg_idx * num_classes + b.labels[neg_m])
        if self.ignore_epsilon is not None:  # FSAF ignore region, owner's class only
            ign_m, ign_p = candidate_pairs(b.boxes, b.level_sizes, b.strides, self.ignore_epsilon, b.box_images)
            not_pos = o.owner[ign_p] < 0
            ignore.append(ign_p[not_pos] * num_classes + b.labels[ign_m[not_pos]])
        return Positives(
            idx=idx,
            instance=o.instance[q],
            level=o.level[q],
            target=o.target[q],
            weight=weight[q],
            point_weights=point_weights,
            ignore=torch.cat(ignore).unique() if ignore else None,
        )

    def losses(self, batch: Batch, owners: Owners, chosen: Selection, positives: Positives) -> dict[str, Tensor]:
        """Step 4 (Eq. 2 / 5 / 6): focal loss of every (point, class) and IoU loss of positives, each
        weighted by w of its point, summed over the whole batch, one normaliser; the selection loss; and
        the statistics of docs/contracts.md."""
        b, pos = batch, positives
        weight_sum = pos.weight.sum()
        normaliser = (
            weight_sum if self.normaliser == "weight_sum" else pos.weight.new_tensor(pos.weight.numel())
        ).clamp(min=1)
        cls_loss = dense_focal_loss(
            b.logits,
            pos.point_weights,
            pos.idx,
            b.labels[pos.instance],
            pos.ignore,
            self.focal_alpha,
            self.focal_gamma,
        )
        loc_loss = (iou_loss(b.reg[pos.idx], pos.target, self.loc_loss) * pos.weight).sum()
        cls_loss, loc_loss = cls_loss / normaliser, loc_loss / normaliser
        valid = owners.has_candidate & (chosen.argmin >= 0)  # [M] instances with a target level
        num_valid = valid.sum()
        if chosen.logits is not None:
            # the mean cross-entropy over the valid instances, as a masked sum (no host-side branch; 0,
            # with the graph kept, when there is none)
            ce = F.cross_entropy(chosen.logits, chosen.argmin.clamp(min=0), reduction="none")  # [M]
            select_loss = torch.where(valid, ce, torch.zeros_like(ce)).sum() / num_valid.clamp(min=1)
        else:
            select_loss = b.logits.new_zeros(())
        out = {
            "cls": cls_loss,
            "loc": loc_loss,
            "select": select_loss,
            "total": cls_loss + loc_loss + self.lambda_select * select_loss,
            "num_pos": torch.tensor(float(pos.idx.numel()), device=pos.idx.device),
            "pos_weight_sum": weight_sum.detach(),
            "num_unassigned": (~owners.has_candidate).sum().to(b.logits.dtype),
        }
        # mean w_l^B over the valid instances; 0 with none
        mean_w = (chosen.level_weights * valid[:, None]).sum(0) / num_valid.clamp(min=1)  # [L]
        for lvl in range(b.num_levels):
            out[f"sel_w/P{lvl + 3}"] = mean_w[lvl].detach()
        return out

    @staticmethod
    def _diagnostics(batch: Batch, chosen: Selection, positives: Positives) -> Assignment:
        probs = chosen.probs
        if probs is None:
            probs = torch.zeros(batch.num_instances, batch.num_levels, device=batch.logits.device)
        return Assignment(
            instance=positives.instance,
            level=positives.level,
            weight=positives.weight.detach(),
            selection_probs=probs.detach(),
        )
