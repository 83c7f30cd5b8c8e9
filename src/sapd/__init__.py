"""SAPD: Soft Anchor-Point object Detector (Zhu et al., ECCV 2020) on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
