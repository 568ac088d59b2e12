"""bmp-lightning: BBoxMaskPose (ICCV 2025) in Hydra + PyTorch Lightning."""

__version__ = "0.1.0"
