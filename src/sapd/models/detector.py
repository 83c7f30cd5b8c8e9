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
from sapd.models.postprocess import postprocess_detections


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
        eta, topk, epsilon, z, soft_weight, soft_select, unselected, ignore_epsilon, lambda_select,
            loc_loss, focal_alpha, focal_gamma, valid_region, soft_weight_norm, normaliser: see
            :class:`~sapd.models.criterion.SAPDCriterion`.
        score_thresh, pre_nms_topk, nms_thresh, max_detections: see
            :func:`~sapd.models.postprocess.postprocess_detections`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        backbone: nn.Module,
        neck: nn.Module | Callable[..., nn.Module],
        head: nn.Module | Callable[..., nn.Module],
        selection: nn.Module | Callable[..., nn.Module] | None,
        eta: float = 1.0,
        topk: int = 3,
        epsilon: float = 0.2,
        z: float = 4.0,
        soft_weight: bool = True,
        soft_select: bool = True,
        unselected: str = "negative",
        ignore_epsilon: float | None = None,
        lambda_select: float = 0.1,
        loc_loss: str = "iou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        valid_region: str = "cell_overlap",
        soft_weight_norm: str = "none",
        normaliser: str = "weight_sum",
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
    ):
        super().__init__()
        self.num_classes = num_classes
        channels = attach_pyramid(self, backbone, neck)
        self.head = _finish(head, in_channels=channels, num_classes=num_classes)
        self.selection = _finish(selection, in_channels=channels, num_levels=self.num_levels)
        self.criterion = SAPDCriterion(
            num_classes=num_classes,
            eta=eta,
            topk=topk,
            epsilon=epsilon,
            z=z,
            soft_weight=soft_weight,
            soft_select=soft_select,
            unselected=unselected,
            ignore_epsilon=ignore_epsilon,
            lambda_select=lambda_select,
            loc_loss=loc_loss,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            valid_region=valid_region,
            soft_weight_norm=soft_weight_norm,
            normaliser=normaliser,
        )
        self.z = z
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))  # persistent: in state_dict

    def set_phase(self, phase: int) -> None:
        """1: FSAF single-level selection; 2: soft top-k selection (§3.4: second half of training)."""
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        self.phase.fill_(phase)

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
        return self.criterion(outputs, targets, self.strides, self.selection, int(self.phase))

    @torch.no_grad()
    def postprocess(
        self,
        outputs: dict,
        image_sizes: Sequence[tuple[int, int]],
        scale_factors: Sequence[tuple[float, float]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image (§3.4, SPEC §5): ``boxes`` FloatTensor[D, 4] clipped to ``image_sizes``
        (h, w) then divided by ``scale_factors`` (sx, sy), i.e. original pixels; ``scores``; ``labels``."""
        return postprocess_detections(
            outputs["cls_logits"],
            outputs["box_reg"],
            outputs["level_sizes"],
            self.strides,
            image_sizes,
            scale_factors,
            z=self.z,
            score_thresh=self.score_thresh,
            pre_nms_topk=self.pre_nms_topk,
            nms_thresh=self.nms_thresh,
            max_detections=self.max_detections,
        )
