"""SAPD as plain PyTorch modules (no Lightning): backbone, neck, head, selection net, detector; FCOS as a peer.

The classes are imported on first use, so that :mod:`sapd.models.settings` (the loss and post-processing
settings, read by every command's config) can be imported without torch and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sapd.lazy import lazy_exports

_LAZY = {
    "SAPD": "sapd.models.detector",
    "FCOSDetector": "sapd.models.fcos",
    "FPN": "sapd.models.neck",
    "FeatureSelectionNet": "sapd.models.selection",
    "PostProcess": "sapd.models.postprocess",
    "SAPDCriterion": "sapd.models.criterion",
    "SAPDHead": "sapd.models.head",
    "TimmBackbone": "sapd.models.backbone",
}

__all__ = [
    "FPN",
    "SAPD",
    "FCOSDetector",
    "FeatureSelectionNet",
    "PostProcess",
    "SAPDCriterion",
    "SAPDHead",
    "TimmBackbone",
]

if TYPE_CHECKING:
    from sapd.models.backbone import TimmBackbone
    from sapd.models.criterion import SAPDCriterion
    from sapd.models.detector import SAPD
    from sapd.models.fcos import FCOSDetector
    from sapd.models.head import SAPDHead
    from sapd.models.neck import FPN
    from sapd.models.postprocess import PostProcess
    from sapd.models.selection import FeatureSelectionNet

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
