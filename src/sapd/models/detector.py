"""SAPD: backbone -> FPN -> shared head; the training objective and post-processing as separate calls.

``forward`` is the same in train and eval mode (so one pass gives a validation loss and detections);
the feature-selection network runs only inside :meth:`SAPD.loss`, never at inference (§3.4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from sapd.models.anchor_points import level_strides
from sapd.models.criterion import SAPDCriterion
from sapd.models.postprocess import PostProcess


def _finish(part: nn.Module | Callable[..., nn.Module] | None, **kwargs) -> nn.Module | None:
    """A module as given, or built by calling a partial (Hydra ``_partial_: true``) with ``kwargs``."""
    if part is None or isinstance(part, nn.Module):
        return part
    return part(**kwargs)


def attach_pyramid(detector: nn.Module, backbone: nn.Module, neck: nn.Module | Callable[..., nn.Module]) -> int:
    """Sets ``detector.backbone``, ``.neck`` (finished with the backbone's channels), ``.num_levels`` and
    ``.strides`` (s_l of P3..); returns the pyramid's channels. Shared by every dense detector here."""
    detector.backbone = backbone
    detector.neck = _finish(neck, in_channels=list(backbone.out_channels))
    detector.num_levels = getattr(detector.neck, "num_levels", 5)
    detector.strides = level_strides(detector.num_levels, backbone.strides[0])
    return detector.neck.out_channels


class SAPD(nn.Module):
    """Soft Anchor-Point Detector (Zhu et al., ECCV 2020); arguments as in docs/contracts.md.

    Args:
        num_classes: K.
        backbone: module with ``forward(x) -> [C3, C4, C5]``, ``out_channels``, ``strides``.
        neck: module or partial taking ``in_channels`` (-> ``[P3..P7]``, ``out_channels``, ``num_levels``).
        head: module or partial taking ``in_channels``, ``num_classes``.
        selection: module or partial taking ``in_channels``, ``num_levels`` (None: no selection net).
        criterion: the training objective (:class:`~sapd.models.criterion.SAPDCriterion`; default: the paper's).
        postprocess: the post-processing settings (:class:`~sapd.models.postprocess.PostProcess`).
        z: normalisation scalar of the box coding (Eq. 1), shared by the loss and the decoding.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        backbone: nn.Module,
        neck: nn.Module | Callable[..., nn.Module],
        head: nn.Module | Callable[..., nn.Module],
        selection: nn.Module | Callable[..., nn.Module] | None,
        criterion: SAPDCriterion | None = None,
        postprocess: PostProcess | None = None,
        z: float = 4.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        channels = attach_pyramid(self, backbone, neck)
        self.head = _finish(head, in_channels=channels, num_classes=num_classes)
        self.selection = _finish(selection, in_channels=channels, num_levels=self.num_levels)
        self.criterion = criterion if criterion is not None else SAPDCriterion()
        self.criterion.check_levels(self.num_levels)
        if self.criterion.soft_select and self.selection is None:  # else it fails at the phase switch, mid-run
            raise ValueError(
                "model.criterion.soft_select=true needs a feature-selection network: set model.selection "
                "(model=sapd has one) or ablation=fsaf / ablation=sw"
            )
        self.postprocessor = postprocess if postprocess is not None else PostProcess()
        if not float(z) > 0:
            raise ValueError(f"model.z must be > 0; got {z!r}")
        self.z = float(z)
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))  # persistent: in state_dict
        # The phase on the host as well, so that the training step reads it without waiting for the
        # device; refreshed whenever the buffer is loaded from a checkpoint.
        self._phase = 1
        self.register_load_state_dict_post_hook(lambda module, _keys: module._read_phase())

    def _read_phase(self) -> None:
        self._phase = int(self.phase)

    @property
    def current_phase(self) -> int:
        """The training phase (1 or 2) as a Python int."""
        return self._phase

    def set_phase(self, phase: int) -> None:
        """1: FSAF single-level selection; 2: soft top-k selection (§3.4: second half of training)."""
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        self.phase.fill_(phase)
        self._phase = phase

    def forward(self, images: Tensor) -> dict:
        """
        Args:
            images (FloatTensor[N, 3, H, W]): normalised, padded images.
        Returns:
            dict: ``cls_logits`` FloatTensor[N, P, K], ``box_reg`` FloatTensor[N, P, 4] (Eq. 1 distances),
            ``features`` list ``[P3..P7]``, ``level_sizes`` list of ``(H_l, W_l)``.
        """
        features = self.neck(self.backbone(images))
        cls_logits, box_reg = self.head(features)  # [N, P, K], [N, P, 4]
        return {
            "cls_logits": cls_logits,
            "box_reg": box_reg,
            "features": features,
            "level_sizes": [tuple(f.shape[-2:]) for f in features],
        }

    def loss(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Training objective (Eq. 6) and statistics; see docs/contracts.md for the keys.

        Args:
            outputs: :meth:`forward` output.
            targets: per image ``boxes`` FloatTensor[M, 4] (x1, y1, x2, y2 input pixels), ``labels`` LongTensor[M].
        """
        return self.criterion(outputs, targets, self.strides, self.selection, self._phase, z=self.z)

    @torch.no_grad()
    def postprocess(
        self, outputs: dict, image_sizes: Sequence, scale_factors: Sequence | None = None, *, score_thresh=None
    ) -> list[dict[str, Tensor]]:
        """Detections per image (paper §3.4): ``boxes`` FloatTensor[D, 4] clipped to ``image_sizes``
        (h, w) then divided by ``scale_factors`` (sx, sy), i.e. original pixels; ``scores``; ``labels``.
        ``score_thresh``: this call's threshold (None: ``model.postprocess.score_thresh``)."""
        return self.postprocessor(
            outputs["cls_logits"],
            outputs["box_reg"],
            outputs["level_sizes"],
            self.strides,
            image_sizes,
            scale_factors,
            z=self.z,
            score_thresh=score_thresh,
        )
