"""SAPD as plain PyTorch modules (no Lightning): backbone, neck, head, selection net, detector; FCOS as a peer."""

from sapd.models.backbone import TimmBackbone
from sapd.models.criterion import SAPDCriterion
from sapd.models.detector import SAPD
from sapd.models.fcos import FCOSDetector
from sapd.models.head import SAPDHead
from sapd.models.neck import FPN
from sapd.models.postprocess import PostProcess
from sapd.models.selection import FeatureSelectionNet

__all__ = [
    "SAPD",
    "FCOSDetector",
    "FPN",
    "FeatureSelectionNet",
    "PostProcess",
    "SAPDCriterion",
    "SAPDHead",
    "TimmBackbone",
]
