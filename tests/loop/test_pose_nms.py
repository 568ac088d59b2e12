"""Pose-NMS (docs/method.md#the-loop-step-by-step step 3): OKS matrix, greedy suppression, the v1.1 area quirk."""

from __future__ import annotations

import numpy as np
import pytest

from bmp_lightning.loop.pose_nms import greedy_oks_suppression, oks_matrix, pose_nms
from bmp_lightning.structures.keypoints import COCO_SIGMAS


def _person(points: dict[int, tuple[float, float, float]], default=(0.0, 0.0, 0.1)) -> np.ndarray:
    k = np.tile(np.array(default, dtype=np.float64), (17, 1))
    for i, p in points.items():
        k[i] = p
    return k


def test_oks_single_visible_keypoint_box_area_vs_v1_area():
    # GT: only the left shoulder (sigma 0.079) visible; DT 17 px away. Box (50,50,150,250): w*h = 20000,
    # v1 area x2*y2 = 37500.
    gt = _person({5: (100.0, 100.0, 0.9)})
    dt = _person({5: (117.0, 100.0, 0.9)})
    box = np.array([50.0, 50.0, 150.0, 250.0])
    var = (2 * 0.079) ** 2
    o = oks_matrix(np.stack([gt, dt]), np.stack([box, box]), conf_thr=0.3, area_mode="box")
    assert o[0, 1] == pytest.approx(np.exp(-289 / var / 20000 / 2))
    assert o[0, 1] == pytest.approx(0.7487, abs=1e-4)
    o_v1 = oks_matrix(np.stack([gt, dt]), np.stack([box, box]), conf_thr=0.3, area_mode="xyxy_as_xywh")
    assert o_v1[0, 1] == pytest.approx(np.exp(-289 / var / 37500 / 2))
    assert o_v1[0, 1] == pytest.approx(0.8570, abs=1e-4)


def test_oks_fallback_without_visible_keypoints():
    # No GT keypoint above 0.3: distance of each DT keypoint to the GT box expanded 3x, mean over all 17.
    gt = _person({}, default=(20.0, 30.0, 0.1))
    box = np.array([10.0, 10.0, 30.0, 50.0])  # w 20, h 40 -> x in [-10, 50], y in [-30, 90], area 800
    dt = _person({}, default=(20.0, 30.0, 0.9))
    dt[3] = (60.0, 30.0, 0.9)  # 10 px right of the expanded box
    var = (2 * np.asarray(COCO_SIGMAS)) ** 2
    o = oks_matrix(np.stack([gt, dt]), np.stack([box, box]), conf_thr=0.3, area_mode="box")
    expected = (16 + np.exp(-100 / var[3] / 800 / 2)) / 17
    assert o[0, 1] == pytest.approx(expected)
    # v1: the box (10,10,30,50) becomes (10,10,40,60) as xywh -> x in [-30, 90]: the point is inside, OKS = 1.
    o_v1 = oks_matrix(np.stack([gt, dt]), np.stack([box, box]), conf_thr=0.3, area_mode="xyxy_as_xywh")
    assert o_v1[0, 1] == pytest.approx(1.0)


def _confident(n_valid: int, offset=(0.0, 0.0)) -> np.ndarray:
    """17 keypoints on a grid, the first n_valid with score 0.9, the rest 0.1."""
    xy = np.stack(np.meshgrid(np.arange(5) * 20.0, np.arange(4) * 40.0), -1).reshape(-1, 2)[:17]
    k = np.zeros((17, 3))
    k[:, :2] = xy + np.asarray(offset)
    k[:, 2] = 0.1
    k[:n_valid, 2] = 0.9
    return k


BOX = np.array([0.0, 0.0, 100.0, 160.0])


def test_more_confident_keypoints_win():
    a, b = _confident(10), _confident(12)
    keep_old, keep_new = pose_nms(np.stack([a, b]), np.stack([BOX, BOX]), num_old=1)
    assert keep_old.tolist() == [] and keep_new.tolist() == [0]  # new b (12 valid) beats old a (10)
    keep_old, keep_new = pose_nms(np.stack([b, a]), np.stack([BOX, BOX]), num_old=1)
    assert keep_old.tolist() == [0] and keep_new.tolist() == []  # old b beats new a


def test_tie_removes_i_the_argmax_row():
    a = _confident(10)
    # Identical poses: O[0,1] = O[1,0] = 1, argmax takes (0,1) first, equal counts remove i = 0 (the old one).
    keep_old, keep_new = pose_nms(np.stack([a, a.copy()]), np.stack([BOX, BOX]), num_old=1)
    assert keep_old.tolist() == [] and keep_new.tolist() == [0]


def test_below_threshold_both_survive():
    a, b = _confident(12), _confident(12, offset=(300.0, 0.0))
    keep_old, keep_new = pose_nms(np.stack([a, b]), np.stack([BOX, BOX + [300, 0, 300, 0]]), num_old=1)
    assert keep_old.tolist() == [0] and keep_new.tolist() == [0]


def test_removed_row_stays_live():
    # Pair (0,1) first: counts 5 vs 8 -> remove 0. Row 0 is not cleared, so O[0,2] = 0.9 still fires and
    # the already-removed 0 (5 valid) removes 2 (3 valid).
    o = np.array([[0.0, 0.95, 0.9], [0.1, 0.0, 0.1], [0.1, 0.1, 0.0]])
    assert greedy_oks_suppression(o, np.array([5, 8, 3]), thr=0.8).tolist() == [1]


def test_v1_area_quirk_changes_the_outcome():
    # Old A: only the left shoulder valid; new B: shoulder 17 px away plus two more valid keypoints far from A's.
    a = _person({5: (100.0, 100.0, 0.9)})
    b = _person({5: (117.0, 100.0, 0.9), 6: (400.0, 400.0, 0.9), 7: (420.0, 420.0, 0.9)})
    boxes = np.array([[50.0, 50.0, 150.0, 250.0], [50.0, 50.0, 150.0, 250.0]])
    # fixed area: OKS(A->B) = 0.749 < 0.8 -> both kept
    keep_old, keep_new = pose_nms(np.stack([a, b]), boxes, num_old=1, thr=0.8, area_mode="box")
    assert keep_old.tolist() == [0] and keep_new.tolist() == [0]
    # v1 area (x2*y2): OKS(A->B) = 0.857 > 0.8 -> A (1 valid) loses against B (3 valid)
    keep_old, keep_new = pose_nms(np.stack([a, b]), boxes, num_old=1, thr=0.8, area_mode="xyxy_as_xywh")
    assert keep_old.tolist() == [] and keep_new.tolist() == [0]


def test_empty_and_new_only():
    ko, kn = pose_nms(np.zeros((0, 17, 3)), np.zeros((0, 4)), num_old=0)
    assert ko.size == 0 and kn.size == 0
    a = _confident(10)
    ko, kn = pose_nms(a[None], BOX[None], num_old=0)
    assert ko.tolist() == [] and kn.tolist() == [0]
