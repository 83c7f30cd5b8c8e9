"""timm backbone giving C3, C4, C5 (paper §4.1): frozen BatchNorm, frozen early stages, optional DCN,
pretrained weights from timm or a local file.

Freezing follows MMDetection ``ResNet(frozen_stages, norm_eval)``; DCN placement (3x3 convs of the
C3-C5 stages, zero-initialised offsets) follows MMDetection ``dcn=..., stage_with_dcn=(False, True, True,
True)`` and Dai et al. 2017.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by a ``FrozenBatchNorm2d`` holding its statistics
    and affine parameters (as buffers: neither trained nor updated). Returns the (possibly new) module."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class DeformConv3x3(DeformConv2d):
    """A 3x3 ``DeformConv2d`` with its own offset conv (``conv_offset``), zero-initialised so the layer
    equals the plain conv it replaces at init. Weight keys stay those of the replaced conv."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            conv.in_channels, 2 * k, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, self.conv_offset(x))


def _replace_3x3_with_dcn(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (3, 3):
            setattr(module, name, DeformConv3x3(child))
            count += 1
        else:
            count += _replace_3x3_with_dcn(child)
    return count


class TimmBackbone(nn.Module):
    """A timm model with ``features_only=True`` returning ``[C3, C4, C5]`` (strides 8, 16, 32).

    Args:
        name: timm model name (``resnet50``, ``resnet101``, ``resnext101_64x4d``, ``resnet18``, ``resnet10t``...).
        pretrained: load ImageNet weights (from timm's hub, or from ``checkpoint_path``).
        checkpoint_path: local ``.pth`` / ``.safetensors`` file with timm's own state-dict keys; implies
            pretrained weights.
        frozen_stages: -1 nothing frozen; 0 the stem; 1 the stem and the first stage (MMDetection).
        norm_eval: True: every BatchNorm becomes ``FrozenBatchNorm2d``; False: plain trainable BatchNorm
            (from-scratch training of small backbones).
        dcn: deformable 3x3 convs in the stages of C3-C5.
    """

    def __init__(
        self,
        *,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | Path | None = None,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        dcn: bool = False,
    ):
        super().__init__()
        kwargs: dict = {"features_only": True}
        if checkpoint_path is not None:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone checkpoint_path {str(path)!r} is not a file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        elif pretrained:
            kwargs.update(pretrained=True)
        try:
            model = timm.create_model(name, **kwargs)
        except Exception as err:
            if kwargs.get("pretrained") and checkpoint_path is None:
                raise RuntimeError(
                    f"cannot get pretrained weights for backbone {name!r} from timm "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "set model.backbone.checkpoint_path=/path/to/weights or pretrained=false"
                ) from err
            raise
        reductions = model.feature_info.reduction()
        self.out_indices = [reductions.index(r) for r in (8, 16, 32)]
        self.out_channels = [model.feature_info.channels()[i] for i in self.out_indices]
        self.strides = [8, 16, 32]
        stage_names = model.feature_info.module_name()  # module producing each feature level
        if dcn:
            stage_set = {stage_names[i].split(".")[0] for i in self.out_indices}
            for child_name, child in model.named_children():
                if child_name in stage_set:
                    _replace_3x3_with_dcn(child)
        if norm_eval:
            model = freeze_batch_norm(model)
        self.body = model

        # Frozen stages: every top-level module up to and including the one of feature `frozen_stages`.
        self._frozen: list[nn.Module] = []
        if frozen_stages >= 0:
            last = stage_names[frozen_stages].split(".")[0]
            for child_name, child in model.named_children():
                self._frozen.append(child)
                if child_name == last:
                    break
        for m in self._frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        for m in self._frozen:  # frozen stages keep their BatchNorm statistics
            m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """
        Args:
            x (FloatTensor[N, 3, H, W]): normalised images.
        Returns:
            ``[C3, C4, C5]`` at strides 8, 16, 32.
        """
        feats = self.body(x)
        return [feats[i] for i in self.out_indices]
