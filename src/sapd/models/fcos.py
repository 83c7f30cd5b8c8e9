"""FCOS as a peer of SAPD: torchvision's FCOS head, target matching, losses and post-processing over
sapd's own backbone and FPN, with the detector contract of :class:`sapd.models.SAPD`.

``model=fcos`` swaps it in for SAPD with everything else of a run unchanged (data module, optimiser,
schedule, evaluation), so the two detectors are compared on a user's own data by one override.
Nothing of torchvision's FCOS is rewritten here: its ``compute_loss`` (centre sampling radius 1.5,
scale ranges [0, 64], [64, 128], ..., smallest-area match; focal + GIoU + centre-ness BCE, each
divided by the number of foreground points) and its ``postprocess_detections`` (score threshold on
sqrt(cls * centre-ness), per-level top-k, class-aware NMS) run as they are. Only its input transform
is bypassed: sapd's data module has already resized, normalised and padded the images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList

from sapd.models.detector import attach_pyramid
from sapd.models.postprocess import PostProcess, has_area, to_original_pixels

__all__ = ["FCOSDetector"]


class FCOSDetector(nn.Module):
    """FCOS (Tian et al., ICCV 2019) from torchvision over a sapd backbone and FPN.

    Args:
        num_classes: K.
        backbone: module with ``forward(x) -> [C3, C4, C5]``, ``out_channels``, ``strides``.
        neck: module or partial taking ``in_channels`` (-> ``[P3..P7]``, ``out_channels``, ``num_levels``).
        num_convs: convs of each tower of torchvision's ``FCOSHead`` (4 in the paper; GroupNorm(32)).
        center_sampling_radius: in units of the level's stride (torchvision: 1.5).
        postprocess: post-processing settings (config node ``model.postprocess``, as SAPD's), given at
            every call as torchvision's ``score_thresh``, ``topk_candidates``, ``nms_thresh`` and
            ``detections_per_img``; default: SAPD's score threshold 0.05, torchvision's NMS IoU 0.6.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        backbone: nn.Module,
        neck: nn.Module | Callable[..., nn.Module],
        num_convs: int = 4,
        center_sampling_radius: float = 1.5,
        postprocess: PostProcess | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        channels = attach_pyramid(self, backbone, neck)
        if channels % 32:
            raise ValueError(
                f"model.neck.out_channels={channels}: torchvision's FCOS head normalises with GroupNorm(32), "
                "so the FPN width must be a multiple of 32 (64 for model=fcos)"
            )
        features = nn.Identity()  # torchvision's FCOS wants a backbone object; ours runs outside it
        features.out_channels = channels
        anchors = AnchorGenerator(tuple((s,) for s in self.strides), ((1.0,),) * self.num_levels)
        self.fcos = FCOS(
            features,
            num_classes,
            anchor_generator=anchors,
            head=FCOSHead(channels, 1, num_classes, num_convs=num_convs),
            center_sampling_radius=center_sampling_radius,
        )
        self.postprocessor = postprocess if postprocess is not None else PostProcess(nms_thresh=0.6)

    def forward(self, images: Tensor) -> dict:
        """
        Args:
            images (FloatTensor[N, 3, H, W]): normalised, padded images.
        Returns:
            dict: ``cls_logits`` FloatTensor[N, P, K], ``box_reg`` FloatTensor[N, P, 4] (torchvision's
            box coding), ``ctrness`` FloatTensor[N, P, 1], ``features`` ``[P3..P7]``, ``level_sizes``,
            ``input_size`` (H, W) of the padded batch.
        """
        features = self.neck(self.backbone(images))
        head = self.fcos.head(features)
        return {
            "cls_logits": head["cls_logits"],
            "box_reg": head["bbox_regression"],
            "ctrness": head["bbox_ctrness"],
            "features": features,
            "level_sizes": [tuple(f.shape[-2:]) for f in features],
            "input_size": tuple(images.shape[-2:]),
        }

    def _anchors(self, outputs: dict) -> list[Tensor]:
        """torchvision's one anchor per point and level (size = stride), for every image."""
        n = outputs["cls_logits"].shape[0]
        h, w = outputs["input_size"]
        features = outputs["features"]
        empty = features[0].new_empty((n, 0, h, w), dtype=torch.float32)  # only its shape is read
        return self.fcos.anchor_generator(ImageList(empty, [(h, w)] * n), features)

    def _head_outputs(self, outputs: dict) -> dict[str, Tensor]:
        return {
            "cls_logits": outputs["cls_logits"].float(),
            "bbox_regression": outputs["box_reg"].float(),
            "bbox_ctrness": outputs["ctrness"].float(),
        }

    def loss(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """torchvision's FCOS losses in float32: ``cls`` (focal), ``loc`` (GIoU), ``ctrness`` (BCE), ``total``.

        Args:
            targets: per image ``boxes`` FloatTensor[M, 4] (x1, y1, x2, y2 input pixels), ``labels`` LongTensor[M].
        """
        device = outputs["cls_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            tgts = [
                {"boxes": t["boxes"].to(device=device, dtype=torch.float32), "labels": t["labels"].to(device)}
                for t in targets
            ]
            num_per_level = [h * w for h, w in outputs["level_sizes"]]
            parts = self.fcos.compute_loss(tgts, self._head_outputs(outputs), self._anchors(outputs), num_per_level)
        cls, loc, ctr = parts["classification"], parts["bbox_regression"], parts["bbox_ctrness"]
        return {"cls": cls, "loc": loc, "ctrness": ctr, "total": cls + loc + ctr}

    @torch.no_grad()
    def postprocess(
        self, outputs: dict, image_sizes: Sequence, scale_factors: Sequence | None = None, *, score_thresh=None
    ) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` clipped to ``image_sizes`` (h, w) then divided by ``scale_factors``
        (sx, sy), i.e. original pixels, boxes left without area dropped; ``scores`` (sqrt(cls * centre-ness));
        ``labels``. ``score_thresh``: this call's threshold (None: ``model.postprocess.score_thresh``)."""
        post = self.postprocessor
        settings = SimpleNamespace(  # torchvision's method reads its settings from ``self``: given per call
            box_coder=self.fcos.box_coder,
            score_thresh=post.thresh(score_thresh),
            topk_candidates=post.pre_nms_topk,
            nms_thresh=post.nms_thresh,
            detections_per_img=post.max_detections,
        )
        num_per_level = [h * w for h, w in outputs["level_sizes"]]
        split = {k: list(v.split(num_per_level, dim=1)) for k, v in self._head_outputs(outputs).items()}
        anchors = [list(a.split(num_per_level)) for a in self._anchors(outputs)]
        dets = FCOS.postprocess_detections(settings, split, anchors, [tuple(s) for s in image_sizes])
        dets = [{k: v[has_area(det["boxes"])] for k, v in det.items()} for det in dets]  # as SAPD's
        if scale_factors is not None:
            for det, scale in zip(dets, scale_factors):
                det["boxes"] = to_original_pixels(det["boxes"], scale)
        return dets
