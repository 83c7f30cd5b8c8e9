"""SAPD: Soft Anchor-Point object Detector (Zhu et al., ECCV 2020) on PyTorch Lightning and Hydra.

``from sapd import Detector`` is the Python API for inference (:mod:`sapd.api`); it is imported on
first use, so ``import sapd`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sapd.lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["Detections", "Detector", "__version__"]

_LAZY = {"Detector": "sapd.api", "Detections": "sapd.api"}

if TYPE_CHECKING:
    from sapd.api import Detections, Detector

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
