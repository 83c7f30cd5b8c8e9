"""Soft-selected pyramid levels (paper §3.3): the feature-selection network (Table 1), the
instance-dependent loss of every (instance, level), and the phase-1 / phase-2 level assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


class FeatureSelectionNet(nn.Module):
    """Feature-selection network of Table 1 / Fig. 6.

    RoIAlign (``aligned=True``, ``spatial_scale = 1 / s_l``) of each ground-truth box to
    ``roi_size x roi_size`` on every level, concatenated to ``L * C`` channels, then three 3x3 convs
    without padding (7 -> 5 -> 3 -> 1), each + ReLU, and an fc to L logits (softmax outside).

    Args:
        in_channels: channels C of each pyramid level (256 in the paper: 1280 = 5 x 256 inputs).
        num_levels: L.
        roi_size: RoIAlign output size (7; three unpadded 3x3 convs bring it to 1).
        channels: width of the convs.
        detach_features: pool from detached pyramid features, so the selection loss trains only this
            network and not the FPN/backbone. The paper trains it jointly (§4.1 finds the multi-task
            effect negligible, 37.1 vs 37.0 AP); detaching skips RoIAlign's backward, the largest part of
            the selection net's cost with many instances (see benchmarks/).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int = 5,
        roi_size: int = 7,
        channels: int = 256,
        detach_features: bool = False,
    ):
        super().__init__()
        self.num_levels = num_levels
        self.detach_features = detach_features
        self.roi_size = roi_size
        layers: list[nn.Module] = []
        c_in, size = in_channels * num_levels, roi_size
        while size > 1:  # Table 1: 7 -> 5 -> 3 -> 1
            layers += [nn.Conv2d(c_in, channels, 3), nn.ReLU(inplace=True)]
            c_in, size = channels, size - 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * size * size, num_levels)
        for m in self.modules():  # §3.4: all layers Gaussian sigma = 0.01
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, box_images: Tensor, strides: Sequence[int]) -> Tensor:
        """Level logits of each instance.

        Args:
            features: ``[P3..P7]``, each FloatTensor[N, C, H_l, W_l].
            boxes (FloatTensor[M, 4]): x1, y1, x2, y2 in input pixels, all images of the batch.
            box_images (LongTensor[M]): image index of each box.
            strides: ``s_l`` of each level.
        Returns:
            FloatTensor[M, L]: logits; ``softmax(-1)`` gives the soft selection weights w_l^B.
        """
        rois = torch.cat([box_images[:, None].to(boxes.dtype), boxes], dim=1)  # [M, 5]
        first = self.convs[0]
        c = first.in_channels // self.num_levels
        # Table 1's first conv over the concatenation [M, L*C, 7, 7] equals the sum over levels of the
        # conv of each level's RoI features with its slice of the weight; summing avoids holding the
        # concatenated copy (250 MB for 1000 instances at C = 256).
        x = first.bias[None, :, None, None]
        for lvl, (f, s) in enumerate(zip(features, strides)):
            if self.detach_features:
                f = f.detach()
            pooled = roi_align(
                f, rois.to(f.dtype), self.roi_size, spatial_scale=1.0 / s, sampling_ratio=-1, aligned=True
            )  # [M, C, 7, 7]
            x = x + F.conv2d(pooled, first.weight[:, lvl * c : (lvl + 1) * c])  # [M, channels, 5, 5]
        x = self.convs[1:](x)  # ReLU, then 5 -> 3 -> 1
        return self.fc(x.flatten(1))  # [M, L]


@torch.no_grad()
def instance_level_losses(
    point_losses: Tensor, point_instances: Tensor, point_levels: Tensor, num_instances: int, num_levels: int
) -> Tensor:
    """Instance-dependent loss of every (instance, level) (paper §3.3 / FSAF): the mean of the
    per-point losses of the instance's points on that level; +inf where it owns no point there
    (the level is then not a candidate).

    Args:
        point_losses (FloatTensor[Q]): focal loss summed over classes + IoU loss of each owned point.
        point_instances (LongTensor[Q]): owner instance of each point.
        point_levels (LongTensor[Q]): level of each point.
    Returns:
        FloatTensor[M, L].
    """
    flat = point_instances * num_levels + point_levels  # [Q]
    total = point_losses.new_zeros(num_instances * num_levels).index_add_(0, flat, point_losses)
    count = point_losses.new_zeros(num_instances * num_levels).index_add_(0, flat, torch.ones_like(point_losses))
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("inf")))
    return mean.view(num_instances, num_levels)


@torch.no_grad()
def select_levels(
    level_losses: Tensor, probs: Tensor | None, *, soft: bool, topk: int = 3
) -> tuple[Tensor, Tensor, Tensor]:
    """Level assignment of each instance (paper §3.3).

    - ``soft=False`` (phase 1, or SS off): the one level of minimal instance loss, weight 1.
    - ``soft=True`` (phase 2): the ``topk`` levels of minimal loss (all candidate levels when fewer),
      each weighted by the selection net's probability of that level (detached, not renormalised).

    Args:
        level_losses (FloatTensor[M, L]): from :func:`instance_level_losses` (+inf = not a candidate).
        probs (FloatTensor[M, L] or None): softmax of the selection net; needed when ``soft``.
    Returns:
        level_weights (FloatTensor[M, L]): w_l^B, 0 on unselected levels.
        selected (BoolTensor[M, L]): levels the instance is assigned to.
        argmin (LongTensor[M]): level of minimal loss (the selection net's target); -1 when none.
    """
    num_instances, num_levels = level_losses.shape
    candidate = torch.isfinite(level_losses)  # [M, L]
    has_candidate = candidate.any(dim=1)
    argmin = torch.where(
        has_candidate, level_losses.argmin(dim=1), torch.full_like(has_candidate, -1, dtype=torch.long)
    )
    if soft:
        k = min(topk, num_levels)
        top = level_losses.topk(k, dim=1, largest=False).indices  # [M, k]
        selected = torch.zeros_like(candidate).scatter_(1, top, True) & candidate
        level_weights = probs.detach() * selected  # Eq. 5: w_l^B from the selection net
    else:  # one-hot of argmin where there is a candidate (a scatter: no boolean-mask index, no host wait)
        selected = torch.zeros_like(candidate).scatter_(1, argmin.clamp(min=0)[:, None], has_candidate[:, None])
        level_weights = selected.to(level_losses.dtype)
    return level_weights, selected, argmin
