"""Mask and box operations of the BMP loop: exclusive masks, mask-out for the next detection, greedy box NMS.

Reference: docs/method.md#the-loop-step-by-step, steps 1, 5 and 7.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np


def exclusive_masks(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Give each pixel to the covering mask with the highest score (first one on ties); uncovered pixels stay empty.

    Args:
        masks: ``(N, H, W)`` bool (or 0/1).
        scores: ``(N,)`` mask scores (SAM's predicted IoU).

    Returns:
        ``(N, H, W)`` bool, pairwise disjoint.
    """
    masks = np.asarray(masks).astype(bool)
    n = masks.shape[0]
    if n == 0:
        return masks.copy()
    scores = np.asarray(scores, dtype=np.float64).reshape(n)
    # Non-covering masks get -inf so a pixel only goes to a mask that covers it, whatever the scores' sign.
    ranked = np.where(masks, scores[:, None, None], -np.inf)
    winner = ranked.argmax(axis=0)
    covered = masks.any(axis=0)
    return (winner[None] == np.arange(n)[:, None, None]) & covered[None]


def painted_region(
    masks: np.ndarray,
    shape: tuple[int, int],
    mode: Literal["contours", "pixels"] = "contours",
    min_area: float = 50.0,
    dilate: int = 0,
) -> np.ndarray:
    """The ``(H, W)`` bool area that :func:`mask_out` paints for ``masks``.

    Args:
        masks: ``(N, H, W)`` bool masks.
        shape: ``(H, W)`` of the image.
        mode: ``contours`` (v1.1): each mask's external contours with ``cv2.contourArea >= min_area`` are filled
            (``cv2.fillPoly``), so holes inside a person are painted too and specks below ``min_area`` are not;
            ``pixels`` (HEAD): exactly the mask pixels.
        min_area: contour area threshold (contours mode).
        dilate: grow each mask by this many pixels (elliptical kernel) before painting; 0 = upstream. Coarse masks
            (the detector's, without SAM) leave a rim of the person visible, which the next detector pass finds again.
    """
    if mode not in ("contours", "pixels"):
        raise ValueError(f"mask_out mode must be 'contours' or 'pixels', got {mode!r}")
    if dilate < 0:
        raise ValueError(f"mask-out dilation must be >= 0 pixels, got {dilate}")
    region = np.zeros(shape, dtype=np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)) if dilate else None
    for mask in np.asarray(masks):
        mask = mask.astype(np.uint8)
        if not mask.any():
            continue
        if kernel is not None:
            mask = cv2.dilate(mask, kernel)
        if mode == "pixels":
            region |= mask
        else:
            contours, _ = cv2.findContours(mask * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polys = [c.reshape(-1, 1, 2).astype(np.int32) for c in contours if cv2.contourArea(c) >= min_area]
            if polys:
                cv2.fillPoly(region, polys, 1)
    return region.astype(bool)


def mask_out(
    image: np.ndarray,
    masks: np.ndarray,
    mode: Literal["contours", "pixels"] = "contours",
    min_area: float = 50.0,
    fill: int | tuple[int, int, int] = 0,
    dilate: int = 0,
) -> np.ndarray:
    """Paint people out of a copy of ``image`` for the next detection round.

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(N, H, W)`` bool masks to paint.
        mode, min_area, dilate: which pixels, see :func:`painted_region`.
        fill: the paint value (black upstream).

    Returns:
        A new ``(H, W, 3)`` uint8 image.
    """
    out = np.array(image, copy=True)
    color = (fill,) * out.shape[2] if np.isscalar(fill) else tuple(fill)
    out[painted_region(masks, out.shape[:2], mode, min_area, dilate)] = np.asarray(color, dtype=out.dtype)
    return out


def box_nms(bboxes: np.ndarray, scores: np.ndarray, iou: float = 0.3, plus_one: bool = True) -> np.ndarray:
    """Greedy box NMS (mmpose ``nms``): visit boxes by descending score, drop later boxes with IoU > ``iou``.

    Args:
        bboxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.
        iou: overlap above which a box is suppressed (overlap == ``iou`` is kept).
        plus_one: legacy pixel convention, width = x2 - x1 + 1 (mmpose); ``False`` = continuous coordinates.

    Returns:
        Kept indices, by descending score (ties: later index first, as a reversed stable ascending sort).
    """
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if bboxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    off = 1.0 if plus_one else 0.0
    x1, y1, x2, y2 = bboxes.T
    areas = (x2 - x1 + off) * (y2 - y1 + off)
    order = np.argsort(scores, kind="stable")[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + off)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + off)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate boxes: NaN overlap -> suppressed
            ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr <= iou]
    return np.array(keep, dtype=np.int64)
