"""SAM prompt selection (docs/method.md#the-loop-step-by-step step 4): face collapse, threshold, farthest-point order,
v1.1 slip."""

from __future__ import annotations

import numpy as np

from bmp_lightning.loop.prompts import select_negative_prompts, select_prompt_keypoints, select_prompts

# A hand-built person (COCO order). Face: l_eye is the most confident of {nose, eyes}; r_ear, l_wrist,
# r_knee and r_ankle fall below 0.3.
KPTS = np.array(
    [
        [50, 20, 0.60],  # 0 nose
        [52, 18, 0.90],  # 1 l_eye   <- face point
        [48, 18, 0.70],  # 2 r_eye
        [55, 20, 0.50],  # 3 l_ear
        [45, 20, 0.20],  # 4 r_ear   (dropped)
        [60, 40, 0.95],  # 5 l_shoulder
        [40, 40, 0.85],  # 6 r_shoulder
        [65, 60, 0.40],  # 7 l_elbow
        [35, 60, 0.35],  # 8 r_elbow
        [70, 80, 0.25],  # 9 l_wrist (dropped)
        [30, 80, 0.80],  # 10 r_wrist
        [57, 90, 0.88],  # 11 l_hip
        [43, 90, 0.86],  # 12 r_hip
        [58, 120, 0.75],  # 13 l_knee
        [42, 120, 0.10],  # 14 r_knee (dropped)
        [58, 150, 0.92],  # 15 l_ankle
        [42, 150, 0.29],  # 16 r_ankle (dropped)
    ],
    dtype=np.float64,
)


def _which(sel: np.ndarray) -> list[int]:
    """Map selected (x, y) back to COCO indices."""
    return [int(np.flatnonzero((KPTS[:, 0] == x) & (KPTS[:, 1] == y))[0]) for x, y in sel[:, :2]]


def test_hand_built_order():
    # Hand trace (80th percentile of the unpicked confidences, picked = -1):
    #  start l_shoulder (0.95); candidates >= 0.88 {l_ankle, face, l_hip}: l_ankle is farthest (110 px);
    #  >= 0.86 {face 23.4, l_hip 50.1, r_hip 52.8} -> r_hip; >= 0.85 {face 23.4, l_hip 14, r_shoulder 20} -> face;
    #  >= 0.80 {l_hip 14, r_shoulder 20, r_wrist 16.4} -> r_shoulder; >= 0.75 {l_hip 14, r_wrist 16.4, l_knee 30}
    #  -> l_knee. Truncated to 6.
    sel = select_prompt_keypoints(KPTS)
    assert _which(sel) == [5, 15, 12, 1, 6, 13]
    np.testing.assert_allclose(sel[:, 2], [0.95, 0.92, 0.86, 0.90, 0.85, 0.75])
    pts, labels = select_prompts(KPTS)
    assert pts.shape == (6, 2) and pts.dtype == np.float32
    assert labels.tolist() == [1] * 6


def test_all_candidates_without_truncation():
    sel = select_prompt_keypoints(KPTS, num_pos=100)
    idx = _which(sel)
    # 11 keypoints pass: one face point (l_eye), l_ear kept separately, nothing below 0.3.
    assert sorted(idx) == [1, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15]
    assert idx[:6] == [5, 15, 12, 1, 6, 13]


def test_face_collapse_below_visibility_drops_all_face_points():
    k = KPTS.copy()
    k[0:3, 2] = [0.2, 0.25, 0.1]
    idx = _which(select_prompt_keypoints(k, num_pos=100))
    assert not {0, 1, 2} & set(idx)
    assert 3 in idx  # the ear is independent of the face collapse


def test_thresholds_and_fallback():
    k = KPTS.copy()
    k[:, 2] = 0.1
    assert select_prompt_keypoints(k).shape == (0, 3)
    # v1.1: no score > visibility_thr -> the first 6 keypoints, zeroed, are the prompts (points at (0, 0)).
    fb = select_prompt_keypoints(k, zero_point_fallback=True)
    np.testing.assert_array_equal(fb, np.zeros((6, 3)))
    # A single visible point is returned alone.
    k[9, 2] = 0.5
    assert _which(select_prompt_keypoints(k)) == [9]


def test_v1_index_slip_changes_the_second_point():
    # With the slip the percentile confidences come from the collapsed, unfiltered array in the filtered order:
    # l_shoulder(0) l_ankle(.86) face(.9) l_hip(0) r_hip(.8) r_shoulder(.95) r_wrist(.35) l_knee(.88) ...
    # -> 80th percentile .88, candidates {face, r_shoulder, l_knee}: l_knee (80 px) is farthest from l_shoulder.
    sel = select_prompt_keypoints(KPTS, index_slip=True)
    idx = _which(sel)
    assert idx[:2] == [5, 13]
    assert idx != _which(select_prompt_keypoints(KPTS))
    assert sorted(idx) != sorted([5, 15, 12, 1, 6, 13])


def test_truncation_keeps_the_order_prefix():
    pts, labels = select_prompts(KPTS, num_pos=3)
    assert labels.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(pts, KPTS[[5, 15, 12], :2].astype(np.float32))


def test_negative_prompts_closest_first():
    others = np.zeros((1, 17, 3))
    others[0, :3] = [[10, 0, 0.9], [5, 0, 0.6], [1, 0, 0.4]]  # the last is below 0.5
    neg = select_negative_prompts(others, center=np.array([0.0, 0.0]), num_neg=5)
    np.testing.assert_allclose(neg, [[5, 0], [10, 0]])
    assert select_negative_prompts(others, np.zeros(2), num_neg=0).shape == (0, 2)
