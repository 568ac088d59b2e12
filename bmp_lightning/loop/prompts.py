"""SAM prompts from a pose: up to 6 positive keypoints in confidence-guided farthest-point order.

Reference: docs/method.md#the-loop-step-by-step step 4 (BBoxMaskPose v1.1 ``demo/sam2_utils.py::_select_keypoints`` with
``selection_method='distance+confidence'``, called from ``_pose2seg``).
"""

from __future__ import annotations

import numpy as np

# Negative prompts ("closest" method upstream) only use other people's keypoints above this score.
NEG_KPT_THR = 0.5


def _farthest_point_order(coords: np.ndarray, pct_conf: np.ndarray) -> list[int]:
    """Greedy farthest-point order over ``coords`` (already sorted by confidence, most confident first).

    Each step picks, among candidates whose ``pct_conf`` is >= the 80th percentile of ``pct_conf`` (picked entries
    set to -1, which lowers the percentile as picking proceeds), the one farthest from the picked set (largest minimum
    distance; first index on ties).
    """
    conf = pct_conf.astype(np.float64).copy()
    dist = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=2)
    picked = [0]
    conf[0] = -1.0
    for _ in range(coords.shape[0] - 1):
        min_dist = dist[:, picked].min(axis=1)
        min_dist[conf < np.percentile(conf, 80)] = -1.0
        nxt = int(np.argmax(min_dist))
        picked.append(nxt)
        conf[nxt] = -1.0
    return picked


def select_prompt_keypoints(
    kpts: np.ndarray,
    num_pos: int = 6,
    conf_thr: float = 0.3,
    visibility_thr: float = 0.3,
    index_slip: bool = False,
    zero_point_fallback: bool = False,
) -> np.ndarray:
    """Positive SAM prompt keypoints of one person, in prompting order.

    Steps (v1.1): zero ``(x, y, s)`` of keypoints with score < ``conf_thr``; collapse {nose, l_eye, r_eye} into the
    most confident of the three if it is >= ``visibility_thr`` (ears stay separate); keep scores >= ``visibility_thr``;
    sort by confidence (descending; ties: higher index first); order by greedy farthest-point sampling from the most
    confident point, candidates restricted to confidence >= the 80th percentile of the not-yet-picked ones; truncate
    to ``num_pos``.

    Args:
        kpts: ``(K, 3)`` (x, y, score), COCO order (K = 17; the face is rows 0-2).
        num_pos: maximum number of prompts.
        conf_thr: keypoints below are zeroed first.
        visibility_thr: face-collapse and keep threshold.
        index_slip: reproduce v1.1's slip: the percentile confidences are gathered from the unfiltered (face-collapsed)
            keypoints with the order of the filtered ones.
        zero_point_fallback: v1.1 behaviour when no score is > ``visibility_thr``: return the first ``num_pos``
            (zeroed) keypoints as they are. Otherwise such a person gets no prompt.

    Returns:
        ``(P, 3)`` float64 (x, y, score), ``P <= num_pos``.
    """
    k = np.array(kpts, dtype=np.float64, copy=True).reshape(-1, 3)
    k[k[:, 2] < conf_thr] = 0.0
    if zero_point_fallback and not (k[:, 2] > visibility_thr).any():
        return k[:num_pos].copy()

    face = int(np.argmax(k[:3, 2]))
    if k[face, 2] >= visibility_thr:
        k = np.concatenate([k[face : face + 1], k[3:]], axis=0)

    conf = k[:, 2]
    keep = conf >= visibility_thr
    coords, confs = k[keep, :2], conf[keep]
    if coords.shape[0] == 0:
        return np.zeros((0, 3), dtype=np.float64)

    order = np.argsort(confs, kind="stable")[::-1]
    pct_conf = k[order, 2] if index_slip else confs[order]
    coords, confs = coords[order], confs[order]
    picked = _farthest_point_order(coords, pct_conf)
    out = np.concatenate([coords[picked], confs[picked, None]], axis=1)
    return out[:num_pos]


def select_prompts(
    kpts: np.ndarray,
    num_pos: int = 6,
    conf_thr: float = 0.3,
    visibility_thr: float = 0.3,
    index_slip: bool = False,
    zero_point_fallback: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive point prompts for SAM: ``points (P, 2)`` float32 xy and ``labels (P,)`` int64 (all 1).

    See :func:`select_prompt_keypoints` for the selection rule and the arguments.
    """
    sel = select_prompt_keypoints(kpts, num_pos, conf_thr, visibility_thr, index_slip, zero_point_fallback)
    return sel[:, :2].astype(np.float32), np.ones(sel.shape[0], dtype=np.int64)


def select_negative_prompts(
    other_kpts: np.ndarray, center: np.ndarray, num_neg: int, conf_thr: float = 0.3, thr: float = NEG_KPT_THR
) -> np.ndarray:
    """Negative prompts: other people's keypoints with score > ``thr``, closest to ``center`` first, ``<= num_neg``.

    A simplified version of v1.1's "closest" method (which D3 never uses: ``num_neg_keypoints = 0``).

    Args:
        other_kpts: ``(M, K, 3)`` keypoints of the other people.
        center: ``(2,)`` the prompted person's box centre.
    Returns:
        ``(Q, 2)`` float32 points.
    """
    if num_neg <= 0 or other_kpts is None or len(other_kpts) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    pts = np.asarray(other_kpts, dtype=np.float64).reshape(-1, 3)
    pts = pts[(pts[:, 2] >= conf_thr) & (pts[:, 2] > thr)]
    d = np.linalg.norm(pts[:, :2] - np.asarray(center, dtype=np.float64)[None], axis=1)
    return pts[np.argsort(d, kind="stable")[:num_neg], :2].astype(np.float32)
