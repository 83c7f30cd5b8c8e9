"""Feature pyramid P3-P7 (paper §4.1): RetinaNet-style FPN and the optional Balanced Feature Pyramid.

FPN facts from Lin et al. 2017 and torchvision ``ops/feature_pyramid_network.py`` (``LastLevelP6P7``);
BFP facts from Pang et al. 2019 (Libra R-CNN) and MMDetection ``necks/bfp.py`` / ``NonLocal2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): ``x + W softmax(theta(x)^T phi(x)) g(x)``.

    As MMDetection's BFP uses it: inter channels = channels (reduction 1), no 1/sqrt(C) scaling, and
    the output conv zero-initialised so the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 1):
        super().__init__()
        inter = max(channels // reduction, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.out = nn.Conv2d(inter, channels, 1)
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # [N, HW, C']
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [N, HW, C']
        phi = self.phi(x).flatten(2)  # [N, C', HW]
        # The attention in float32 under any autocast: theta^T phi sums C' products unscaled (no
        # 1/sqrt(C')), so its logits leave half precision's range (65504) on real features.
        with torch.autocast(device_type=x.device.type, enabled=False):
            attn = torch.bmm(theta.float(), phi.float()).softmax(-1)  # [N, HW, HW] embedded Gaussian
            y = torch.bmm(attn, g.float()).transpose(1, 2).reshape(n, -1, h, w)  # [N, C', H, W]
        return x + self.out(y.to(x.dtype))


class BalancedFeaturePyramid(nn.Module):
    """BFP (Libra R-CNN): resize every level to the refine level (max-pool down, nearest up), average,
    refine with a non-local block, resize back and add to each level as a residual.

    Args:
        channels: channels of each level.
        refine_level: index of the level refined (1 = P4 for P3-P7, as Libra R-CNN).
        fixed_ratio: the export form: each adaptive max pooling written as ``max_pool2d`` of kernel =
            stride = the size ratio of the two levels, ``2 ** (level distance)``. Equal to the adaptive form
            whenever every level is exactly half the one below (inputs a multiple of the coarsest stride):
            the adaptive windows are then ``[i k, (i + 1) k)``. ONNX has no adaptive max pooling, and
            ``torch.onnx.export`` would bake the example's sizes into its decomposition. Off in training.
    """

    def __init__(self, channels: int, refine_level: int = 1, fixed_ratio: bool = False):
        super().__init__()
        self.refine_level = refine_level
        self.refine = NonLocal2d(channels)
        self.fixed_ratio = fixed_ratio

    def _max_pool(self, x: Tensor, size: Sequence[int], levels: int) -> Tensor:
        """``x`` max-pooled to ``size``, ``levels`` pyramid levels coarser."""
        if not self.fixed_ratio:
            return F.adaptive_max_pool2d(x, size)
        return F.max_pool2d(x, 2**levels) if levels > 0 else x

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        r = self.refine_level
        size = feats[r].shape[-2:]
        gathered = [
            self._max_pool(f, size, r - i) if i < r else F.interpolate(f, size=size, mode="nearest")
            for i, f in enumerate(feats)
        ]
        bsf = self.refine(torch.stack(gathered).mean(0))  # [N, C, H_r, W_r]
        outs = []
        for i, f in enumerate(feats):
            if i < r:
                res = F.interpolate(bsf, size=f.shape[-2:], mode="nearest")
            else:
                res = self._max_pool(bsf, f.shape[-2:], i - r)
            outs.append(f + res)
        return outs


class FPN(nn.Module):
    """RetinaNet FPN: P3-P5 from lateral 1x1 + top-down nearest upsampling + 3x3; P6 = 3x3 stride-2 conv
    on C5; P7 = ReLU then 3x3 stride-2 conv on P6 (RetinaNet). Optional BFP on the result.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level (256 in the paper).
        num_levels: pyramid levels (5: P3-P7).
        bfp: add the Balanced Feature Pyramid.
    """

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = 256, num_levels: int = 5, bfp: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.num_levels = num_levels
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        extra = num_levels - len(in_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(extra)
        )
        for m in self.modules():  # torchvision FPN init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
        self.bfp = BalancedFeaturePyramid(out_channels, refine_level=1) if bfp else None

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """
        Args:
            feats: ``[C3, C4, C5]``, FloatTensor[N, C_i, H_i, W_i].
        Returns:
            ``[P3, ..., P7]``, FloatTensor[N, out_channels, H_l, W_l].
        """
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down; sizes may be odd, so upsample to the exact size
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, lat)]
        x = feats[-1]
        for i, conv in enumerate(self.extra):
            x = conv(x if i == 0 else F.relu(x))  # P6 on C5; P7 on ReLU(P6)
            outs.append(x)
        if self.bfp is not None:
            outs = self.bfp(outs)
        return outs
