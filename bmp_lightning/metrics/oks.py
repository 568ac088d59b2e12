"""Object keypoint similarity (OKS) and greedy OKS-NMS.

OKS between keypoint sets g and d over an object of area ``a`` (COCO definition):

    e_k = ||g_k - d_k||^2 / (2 sigma_k)^2 / (a + eps) / 2,    OKS = mean_k exp(-e_k)

where the mean runs over the keypoints that count (COCOeval: ground-truth visibility > 0; MMPose's ``oks_nms``:
all keypoints). ``eps`` is ``np.spacing(1)`` as in pycocotools and MMPose.

Arrays may be numpy arrays or CPU torch tensors; results are numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from bmp_lightning.structures.keypoints import CROWDPOSE_SIGMAS, schema_for

EPS = float(np.spacing(1))


def default_sigmas(num_keypoints: int, dataset: str | None = None) -> np.ndarray:
    """OKS sigmas ``(K,)`` for ``K`` keypoints: a registered schema's (the 21-slot schema, its COCO-17 part), or
    CrowdPose-14."""
    schema = schema_for(num_keypoints)
    if dataset == "crowdpose" or (dataset is None and num_keypoints == 14):
        sig = CROWDPOSE_SIGMAS
    elif schema is not None:
        sig = schema.sigmas[:num_keypoints]
    else:
        raise ValueError(f"no default OKS sigmas for {num_keypoints} keypoints; pass sigmas explicitly")
    if len(sig) != num_keypoints:
        raise ValueError(f"{dataset} sigmas have {len(sig)} entries, keypoints have {num_keypoints}")
    return np.asarray(sig, dtype=np.float64)


def _as_np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sigmas(sigmas: Sequence[float] | np.ndarray | None, num_keypoints: int) -> np.ndarray:
    if sigmas is None:
        return default_sigmas(num_keypoints)
    sig = _as_np(sigmas)
    if sig.shape != (num_keypoints,):
        raise ValueError(f"sigmas must have shape ({num_keypoints},), got {sig.shape}")
    return sig


def oks(
    gt_kpts,
    dt_kpts,
    area,
    sigmas: Sequence[float] | np.ndarray | None = None,
    vis_thr: float | None = 0.0,
) -> np.ndarray:
    """OKS between ground truth and detections (broadcast over leading dims).

    Args:
        gt_kpts: ``(..., K, 2)`` or ``(..., K, 3)``; the third column is the visibility / score.
        dt_kpts: ``(..., K, 2)`` or ``(..., K, 3)`` (third column ignored).
        area: object area, broadcastable to the leading dims ``(...)``.
        sigmas: ``(K,)`` per-keypoint sigmas (default by ``K``: COCO-17, 21-slot, CrowdPose-14).
        vis_thr: keypoints count when ``gt[..., 2] > vis_thr`` (COCOeval: 0); ``None`` counts every keypoint
            (MMPose ``oks_nms``). With no counted keypoint the OKS is 0.

    Returns:
        ``(...)`` OKS values in [0, 1].
    """
    g = _as_np(gt_kpts)
    d = _as_np(dt_kpts)
    k = g.shape[-2]
    if d.shape[-2] != k:
        raise ValueError(f"gt has {k} keypoints, dt has {d.shape[-2]}")
    var = (2.0 * _sigmas(sigmas, k)) ** 2
    sq = ((g[..., :2] - d[..., :2]) ** 2).sum(-1)  # (..., K)
    e = sq / var / (_as_np(area)[..., None] + EPS) / 2.0
    terms = np.exp(-e)
    if vis_thr is None:
        return terms.mean(-1)
    if g.shape[-1] < 3:
        raise ValueError("vis_thr needs gt keypoints with a third (visibility) column; pass vis_thr=None")
    counted = g[..., 2] > vis_thr
    counted = np.broadcast_to(counted, terms.shape)
    n = counted.sum(-1)
    total = np.where(counted, terms, 0.0).sum(-1)
    return np.where(n > 0, total / np.maximum(n, 1), 0.0)


def oks_matrix(
    kpts_a,
    kpts_b,
    areas_a,
    areas_b=None,
    sigmas: Sequence[float] | np.ndarray | None = None,
    vis_thr: float | None = None,
    area_mode: Literal["mean", "a"] = "mean",
) -> np.ndarray:
    """Pairwise OKS ``(N, M)`` between ``kpts_a (N, K, 2|3)`` and ``kpts_b (M, K, 2|3)``.

    ``area_mode='mean'`` uses ``(areas_a[i] + areas_b[j]) / 2`` (MMPose ``oks_nms``); ``'a'`` uses ``areas_a[i]``
    (set ``a`` as the ground truth, COCOeval). Visibility (``vis_thr``) is read from ``kpts_a``'s third column.
    """
    a = _as_np(kpts_a)
    b = _as_np(kpts_b)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"expected (N, K, C) and (M, K, C) keypoints, got {a.shape} and {b.shape}")
    area_a = _as_np(areas_a).reshape(-1)
    if area_mode == "mean":
        if areas_b is None:
            raise ValueError("area_mode='mean' needs areas_b")
        area = (area_a[:, None] + _as_np(areas_b).reshape(-1)[None, :]) / 2.0
    elif area_mode == "a":
        area = np.broadcast_to(area_a[:, None], (a.shape[0], b.shape[0]))
    else:
        raise ValueError(f"unknown area_mode {area_mode!r}")
    return oks(a[:, None], b[None, :], area, sigmas=sigmas, vis_thr=vis_thr)


def oks_nms(
    kpts,
    scores,
    areas,
    thr: float = 0.9,
    sigmas: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Greedy OKS-NMS as MMPose's ``oks_nms`` (``mmpose/evaluation/functional/nms.py``).

    Candidates are visited by descending score (ties: lower index first); a candidate is kept only if its OKS with
    every kept instance is ``<= thr``. All keypoints count (no visibility threshold) and the OKS area of a pair is the
    mean of the two instances' areas.

    Args:
        kpts: ``(N, K, 2|3)`` keypoints (a third column is ignored).
        scores: ``(N,)`` instance scores.
        areas: ``(N,)`` instance areas.
        thr: suppression threshold on OKS.
        sigmas: ``(K,)`` (default by ``K``).

    Returns:
        ``(M,)`` int64 indices of the kept instances, in the order they were kept (highest score first).
    """
    k = _as_np(kpts)
    s = _as_np(scores).reshape(-1)
    n = s.shape[0]
    if n == 0:
        return np.zeros((0,), dtype=np.int64)
    if k.shape[0] != n:
        raise ValueError(f"{k.shape[0]} keypoint sets but {n} scores")
    order = np.argsort(-s, kind="stable")
    ious = oks_matrix(k, k, areas, areas, sigmas=sigmas, vis_thr=None, area_mode="mean")
    keep: list[int] = []
    suppressed = np.zeros(n, dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= ious[i] > thr
    return np.asarray(keep, dtype=np.int64)
