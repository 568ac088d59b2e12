"""PCK / PCKh on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from bmp_lightning.metrics.pck import PCKEvaluator, bbox_norm, mpii_head_size, pck, pckh


def _case():
    gt = np.zeros((3, 2, 2))
    pred = np.zeros((3, 2, 2))
    pred[0, 0] = [0.6, 0.8]  # distance 1, norm 10 -> 0.1 < 0.2: correct
    pred[0, 1] = [3.0, 0.0]  # 0.3: wrong
    pred[1, 0] = [3.0, 4.0]  # distance 5, norm 20 -> 0.25: wrong
    pred[1, 1] = [0.0, 1.0]  # invisible: not counted
    pred[2] = 100.0  # norm 0: instance skipped
    visible = np.array([[1, 1], [1, 0], [1, 1]])
    norm = np.array([10.0, 20.0, 0.0])
    return pred, gt, visible, norm


def test_pck_hand_computed():
    pred, gt, visible, norm = _case()
    res = pck(pred, gt, visible, norm, thr=0.2)
    np.testing.assert_allclose(res.per_keypoint, [0.5, 0.0])
    np.testing.assert_array_equal(res.counts, [2, 1])
    assert res.mean == pytest.approx(0.25)  # mean over keypoints, MMPose style
    assert float(res) == res.mean
    # a looser threshold makes everything counted correct
    assert pck(pred, gt, visible, norm, thr=0.31).mean == 1.0
    # a keypoint with no valid instance is NaN and left out of the mean
    res = pck(pred, gt, np.array([[1, 0], [1, 0], [1, 0]]), norm, thr=0.2)
    assert np.isnan(res.per_keypoint[1]) and res.mean == pytest.approx(0.5)


def test_norm_helpers():
    np.testing.assert_allclose(bbox_norm([[10, 20, 40, 100], [0, 0, 50, 5]]), [80.0, 50.0])
    np.testing.assert_allclose(mpii_head_size([[0, 0, 30, 40]]), [30.0])  # 0.6 * 50
    gt = np.zeros((1, 1, 2))
    assert pckh(np.array([[[14.0, 0.0]]]), gt, [[1]], [[0, 0, 30, 40]]).mean == 1.0  # 14/30 < 0.5
    assert pckh(np.array([[[16.0, 0.0]]]), gt, [[1]], [[0, 0, 30, 40]]).mean == 0.0


def test_evaluator_dedups_and_reports_names():
    pred, gt, visible, _ = _case()
    boxes = [[0, 0, 10, 5], [0, 0, 20, 20], [0, 0, 0, 0]]
    ev = PCKEvaluator(norm="bbox", keypoint_names=("a", "b"))
    items = [
        {"instance_id": i, "keypoints": pred[i], "gt_keypoints": gt[i], "gt_visible": visible[i], "bbox": boxes[i]}
        for i in range(3)
    ]
    ev.process(items + items[:1])
    assert ev.evaluate() == pytest.approx({"PCK": 0.25, "PCK_a": 0.5, "PCK_b": 0.0})
    assert PCKEvaluator().evaluate() == {"PCK": 0.0}
