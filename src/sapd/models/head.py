"""The shared detection head (paper §3.1, Fig. 2): a classification and a localisation subnet."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups (256 channels: 8 per group), or fewer when channels are few: the largest
    divisor of ``channels`` that leaves at least 2 channels per group (1 channel on a 1x1 map would be
    undefined, and PyTorch refuses it)."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 2 or g == 1)
    return nn.GroupNorm(groups, channels)


def _subnet(in_channels: int, feat_channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1))
        if norm == "gn":
            layers.append(group_norm(feat_channels))
        elif norm is not None:
            raise ValueError(f"norm must be None or 'gn', got {norm!r}")
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SAPDHead(nn.Module):
    """Head shared across levels: ``num_convs`` x (3x3 conv + [GN] + ReLU) then a 3x3 conv to K class
    logits (sigmoid outside); the same tower then a 3x3 conv to 4 distances followed by ReLU.

    Init (§3.4): Gaussian sigma = 0.01 weights, cls bias ``-log((1 - 0.01) / 0.01)``, loc bias 0.1.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: K.
        feat_channels: width of the towers (256 in the paper; fewer for CPU runs).
        num_convs: convs per tower (4 in the paper).
        norm: None or ``"gn"``.
        prior_prob: pi of the classification bias.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        feat_channels: int = 256,
        num_convs: int = 4,
        norm: str | None = None,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _subnet(in_channels, feat_channels, num_convs, norm)
        self.loc_tower = _subnet(in_channels, feat_channels, num_convs, norm)
        last = feat_channels if num_convs > 0 else in_channels
        self.cls_out = nn.Conv2d(last, num_classes, 3, padding=1)
        self.loc_out = nn.Conv2d(last, 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))  # §3.4
        nn.init.constant_(self.loc_out.bias, 0.1)  # §3.4

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """
        Args:
            features: ``[P3..P7]``, each FloatTensor[N, C, H_l, W_l].
        Returns:
            cls_logits (FloatTensor[N, sum_l H_l W_l, K]), box_reg (FloatTensor[N, sum_l H_l W_l, 4]):
            levels concatenated P3 first, row-major within a level; box_reg are Eq. 1 distances >= 0.
        """
        cls, loc = [], []
        for f in features:
            n = f.shape[0]
            c = self.cls_out(self.cls_tower(f))  # [N, K, H, W]
            d = torch.relu(self.loc_out(self.loc_tower(f)))  # [N, 4, H, W]
            cls.append(c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))  # [N, HW, K]
            loc.append(d.permute(0, 2, 3, 1).reshape(n, -1, 4))  # [N, HW, 4]
        return torch.cat(cls, 1), torch.cat(loc, 1)
