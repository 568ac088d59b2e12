"""Image reading: RGB uint8 everywhere in the project (the detector flips to BGR itself)."""

from __future__ import annotations

import os

import cv2
import numpy as np

from bmp_lightning.data.records import BadSampleError


def read_image(path: str | os.PathLike, where: str = "") -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` RGB uint8 array; a clear error if missing or unreadable."""
    path = os.fspath(path)
    ctx = f" ({where})" if where else ""
    if not os.path.isfile(path):
        raise BadSampleError(f"image not found: {path}{ctx}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise BadSampleError(f"image unreadable or corrupt: {path}{ctx}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def as_rgb_array(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Accept a path or an RGB uint8 array (what the public APIs take)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 array, got {image.dtype} {image.shape}")
        return image
    return read_image(image)
