"""timm backbone giving C3, C4, C5 (paper §4.1): frozen BatchNorm, frozen early stages, optional DCN,
pretrained weights from timm or a local file.

Freezing follows MMDetection ``ResNet(frozen_stages, norm_eval)``; DCN placement (3x3 convs of the
C3-C5 stages, zero-initialised offsets) follows MMDetection ``dcn=..., stage_with_dcn=(False, True, True,
True)`` and Dai et al. 2017.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import load_state_dict
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from sapd.errors import UserError

WEIGHTS_KEY = "model.backbone.checkpoint_path"


class WeightsError(UserError):
    """Backbone weights that cannot be had: not fetchable, not a weights file, or another model's."""


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception from a library (whose messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].split('. ')[0].rstrip('.')}" if text else type(exc).__name__


def load_backbone_weights(model: nn.Module, checkpoint_path: str | Path, name: str) -> None:
    """Loads a local weights file (timm's own state-dict keys; ``.pth`` / ``.safetensors``, read by
    timm's ``load_state_dict``) into the timm feature model ``model`` of ``name``.

    Every tensor of the model must be in the file with its shape (the file's classifier and other
    extra keys are left out); else :class:`WeightsError` names the file, what does not fit and the fix.
    A partial load would train from random weights without a word.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{WEIGHTS_KEY}={checkpoint_path} is not a file: give timm's weights of {name} "
            "(.pth or .safetensors) or null"
        )
    try:
        state = load_state_dict(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for a file that is not weights
        raise WeightsError(
            f"{WEIGHTS_KEY}={checkpoint_path} cannot be read as weights ({_first_line(exc)}): "
            f"give a state dict of timm's {name} (.pth or .safetensors)"
        ) from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{WEIGHTS_KEY}={checkpoint_path} holds a {type(state).__name__}, not a state dict")
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    wrong = [
        (k, tuple(getattr(state[k], "shape", ())), tuple(v.shape))
        for k, v in own.items()
        if k in state and (not isinstance(state[k], Tensor) or tuple(state[k].shape) != tuple(v.shape))
    ]
    if missing or wrong:
        what = []
        if missing:
            what.append(f"{len(missing)} of its {len(own)} tensors are missing (e.g. {missing[0]})")
        if wrong:
            k, theirs, ours = wrong[0]
            what.append(f"{len(wrong)} have another shape (e.g. {k}: {list(theirs)} in the file, {list(ours)} here)")
        raise WeightsError(
            f"{WEIGHTS_KEY}={checkpoint_path} does not hold the weights of backbone {name}: "
            f"{'; '.join(what)}; give timm's weights of {name}, or the model.backbone.name the file is for"
        )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


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
        if not timm.is_model(name):
            raise WeightsError(
                f"model.backbone.name={name!r} is not a timm model "
                "(e.g. resnet50, resnet101, resnext101_64x4d, resnet10t)"
            )
        fetch = pretrained and checkpoint_path is None
        try:
            model = timm.create_model(name, features_only=True, pretrained=fetch)
        except Exception as err:
            if fetch:
                raise WeightsError(
                    f"cannot get the pretrained weights of backbone {name!r} from timm's hub ({_first_line(err)}); "
                    f"download them where there is a network and give {WEIGHTS_KEY}=/path/to/weights "
                    "(.pth or .safetensors), or model.backbone.pretrained=false to train from scratch"
                ) from err
            raise
        if checkpoint_path is not None:
            load_backbone_weights(model, checkpoint_path, name)
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
            model = freeze_batch_norm_2d(model)  # torchvision's FrozenBatchNorm2d in place of every BatchNorm
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
