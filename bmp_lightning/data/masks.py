"""COCO segmentation <-> binary mask helpers (pycocotools for RLE, cv2 for contours)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons (list of flat lists), uncompressed RLE or compressed RLE -> ``(H, W)`` uint8 0/1 mask."""
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rles = mask_utils.frPyObjects(polys, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    else:
        raise TypeError(f"unsupported segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict:
    """``(H, W)`` binary mask -> compressed RLE with a json-friendly ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """External contours of a binary mask as COCO polygons (holes are filled, tiny specks dropped)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) > min_points]
