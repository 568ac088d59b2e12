"""Mask and box operations: exclusive masks, mask-out, greedy box NMS.

Mask-out is one function for training and inference: the BMP loop paints the people it found before the next
detection (docs/method.md#the-loop-step-by-step, steps 1, 5 and 7) and ``RemoveRandomInstances`` paints random people
out of detector training images so that the detector learns to ignore those holes; both call :func:`mask_out`.
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
    protect: np.ndarray | None = None,
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
        protect: ``(M, H, W)`` bool masks the *growth* may not cover (the people who stay visible); the masks' own
            region is painted regardless.
    """
    if mode not in ("contours", "pixels"):
        raise ValueError(f"mask_out mode must be 'contours' or 'pixels', got {mode!r}")
    if dilate < 0:
        raise ValueError(f"mask-out dilation must be >= 0 pixels, got {dilate}")
    if dilate and protect is not None and len(protect):
        own = painted_region(masks, shape, mode, min_area, 0)
        grown = painted_region(masks, shape, mode, min_area, dilate)
        return own | (grown & ~np.asarray(protect).astype(bool).any(axis=0))
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


def paint(
    image: np.ndarray,
    region: np.ndarray,
    fill: int | tuple[int, int, int] | Literal["noise"] = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A copy of ``image`` with ``region`` painted: a value or colour (black = 0, upstream), or ``'noise'`` (uniform
    random RGB per pixel, drawn from ``rng``)."""
    out = np.array(image, copy=True)
    if isinstance(fill, str):
        if fill != "noise":
            raise ValueError(f"mask-out fill must be a value, a colour or 'noise', got {fill!r}")
        if rng is None:
            raise ValueError("mask-out fill='noise' needs an rng")
        out[region] = rng.integers(0, 256, size=(int(region.sum()), out.shape[2]), dtype=out.dtype)
        return out
    color = (fill,) * out.shape[2] if np.isscalar(fill) else tuple(fill)
    out[region] = np.asarray(color, dtype=out.dtype)
    return out


def mask_out(
    image: np.ndarray,
    masks: np.ndarray,
    mode: Literal["contours", "pixels"] = "contours",
    min_area: float = 50.0,
    fill: int | tuple[int, int, int] | Literal["noise"] = 0,
    dilate: int = 0,
    protect: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Paint people out of a copy of ``image`` (the BMP loop before each detection, ``RemoveRandomInstances`` in
    detector training).

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(N, H, W)`` bool masks to paint.
        mode, min_area, dilate, protect: which pixels, see :func:`painted_region`.
        fill, rng: the paint, see :func:`paint` (black upstream).

    Returns:
        A new ``(H, W, 3)`` uint8 image.
    """
    region = painted_region(masks, np.asarray(image).shape[:2], mode, min_area, dilate, protect)
    return paint(image, region, fill, rng)


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
