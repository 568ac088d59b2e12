"""bmp-lightning: BBoxMaskPose (ICCV 2025) in Hydra + PyTorch Lightning.

Public inference API (imported lazily so `import bmp_lightning` stays light):
``PoseEstimator`` (ViTPose / MaskPose), ``Detector`` (RTMDet-Ins), ``BMP`` (the iterative loop).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["BMP", "Detector", "PoseEstimator", "__version__"]

_LAZY = {
    "PoseEstimator": "bmp_lightning.pose",
    "Detector": "bmp_lightning.detector",
    "BMP": "bmp_lightning.loop.bmp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bmp_lightning' has no attribute {name!r}")
