"""Pose-NMS between the instances kept so far ("old") and the new ones of a BMP iteration.

Reference: BBoxMaskPose v1.1 ``demo/demo_utils.py::pose_nms`` (docs/method.md#the-loop-step-by-step).
A full, asymmetric OKS matrix is built with row ``i`` as ground truth (keypoints with score > ``conf_thr`` are its
visible keypoints) and column ``j`` as detection; pairs above the threshold are resolved greedily from the largest OKS.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bmp_lightning.structures.keypoints import COCO_SIGMAS

AreaMode = Literal["box", "xyxy_as_xywh"]


def _gt_box_xywh(box_xyxy: np.ndarray, area_mode: AreaMode) -> tuple[np.ndarray, float]:
    """The ``(x, y, w, h)`` box and area OKS uses for a "ground truth" instance."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if area_mode == "box":
        w, h = x2 - x1, y2 - y1
        return np.array([x1, y1, w, h]), w * h
    if area_mode == "xyxy_as_xywh":
        # v1.1 takes the xyxy box for xywh: area = x2*y2, and the fallback box becomes (x1, y1, x1+x2, y1+y2) as xywh.
        return np.array([x1, y1, x1 + x2, y1 + y2]), x2 * y2
    raise ValueError(f"area_mode must be 'box' or 'xyxy_as_xywh', got {area_mode!r}")


def oks_matrix(
    kpts: np.ndarray,
    bboxes: np.ndarray,
    conf_thr: float = 0.3,
    sigmas: np.ndarray | tuple[float, ...] = COCO_SIGMAS,
    area_mode: AreaMode = "box",
) -> np.ndarray:
    """OKS of every ordered pair: ``O[i, j]`` with ``i`` as GT and ``j`` as detection; the diagonal is computed too.

    Args:
        kpts: ``(N, K, 3)`` (x, y, score).
        bboxes: ``(N, 4)`` xyxy boxes (GT boxes for the area and the fallback).
        conf_thr: GT keypoints with score > ``conf_thr`` are visible.
        sigmas: ``(K,)`` OKS sigmas (COCO-17 by default).
        area_mode: ``box`` (w*h) or ``xyxy_as_xywh`` (the v1.1 quirk, x2*y2).

    Returns:
        ``(N, N)`` float64. With no visible GT keypoint, the COCO fallback is used: the distance of each detected
        keypoint to the GT box expanded 3x (``[x-w, x+2w] x [y-h, y+2h]``), averaged over all K keypoints.
    """
    kpts = np.asarray(kpts, dtype=np.float64)
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    sig = np.asarray(sigmas, dtype=np.float64)
    n, k = kpts.shape[:2]
    if sig.shape[0] != k:
        raise ValueError(f"oks_matrix: {k} keypoints but {sig.shape[0]} sigmas")
    var = (2.0 * sig) ** 2
    out = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        box, area = _gt_box_xywh(bboxes[i], area_mode)
        vis = kpts[i, :, 2] > conf_thr
        xd, yd = kpts[:, :, 0], kpts[:, :, 1]  # (N, K): every instance as detection
        if vis.any():
            dx = xd - kpts[i, :, 0]
            dy = yd - kpts[i, :, 1]
        else:
            x0, x1 = box[0] - box[2], box[0] + 2 * box[2]
            y0, y1 = box[1] - box[3], box[1] + 2 * box[3]
            dx = np.maximum(0.0, x0 - xd) + np.maximum(0.0, xd - x1)
            dy = np.maximum(0.0, y0 - yd) + np.maximum(0.0, yd - y1)
        e = (dx**2 + dy**2) / var / (area + np.spacing(1)) / 2
        if vis.any():
            e = e[:, vis]
        out[i] = np.exp(-e).sum(axis=1) / e.shape[1]
    return out


def greedy_oks_suppression(oks: np.ndarray, num_valid: np.ndarray, thr: float) -> np.ndarray:
    """Indices (sorted) that survive the v1.1 greedy loop over an OKS matrix.

    While some ``O > thr``: take the argmax pair ``(i, j)`` (first in row-major order on ties); remove ``j`` if
    ``num_valid[i] > num_valid[j]``, else ``i`` (equal counts remove ``i``); zero column ``remove`` and
    ``O[remove, j]``.
    The removed instance's row stays live, so a removed instance can still suppress others.
    """
    o = np.array(oks, dtype=np.float64, copy=True)
    n = o.shape[0]
    np.fill_diagonal(o, -1.0)
    removed: set[int] = set()
    while (o > thr).any():
        i, j = np.unravel_index(int(np.argmax(o)), o.shape)
        rm = j if num_valid[i] > num_valid[j] else i
        o[:, rm] = 0.0
        o[rm, j] = 0.0
        removed.add(int(rm))
    return np.array([idx for idx in range(n) if idx not in removed], dtype=np.int64)


def pose_nms(
    kpts: np.ndarray,
    bboxes: np.ndarray,
    num_old: int,
    thr: float = 0.8,
    conf_thr: float = 0.3,
    sigmas: np.ndarray | tuple[float, ...] = COCO_SIGMAS,
    area_mode: AreaMode = "box",
) -> tuple[np.ndarray, np.ndarray]:
    """Pose-NMS of old instances (first ``num_old`` rows) against new ones (the rest).

    Args:
        kpts: ``(N, 17, 3)`` (x, y, score), old instances first.
        bboxes: ``(N, 4)`` xyxy boxes in the same order.
        num_old: number of old instances.
        thr: OKS above which a pair is a duplicate (0.8).
        conf_thr: keypoints with score > ``conf_thr`` are valid (count) and GT-visible (OKS).
        sigmas: OKS sigmas (COCO-17).
        area_mode: ``box`` (fixed) or ``xyxy_as_xywh`` (v1.1 quirk).

    Returns:
        ``(keep_old_idx, keep_new_idx)``: sorted indices into the old instances and into the new instances.
    """
    kpts = np.asarray(kpts, dtype=np.float64)
    n = kpts.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    num_valid = (kpts[:, :, 2] > conf_thr).sum(axis=1)
    keep = greedy_oks_suppression(oks_matrix(kpts, bboxes, conf_thr, sigmas, area_mode), num_valid, thr)
    return keep[keep < num_old], keep[keep >= num_old] - num_old
