"""OKS and OKS-NMS against hand-computed values and pycocotools."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bmp_lightning.metrics.oks import default_sigmas, oks, oks_matrix, oks_nms
from bmp_lightning.structures.keypoints import COCO_SIGMAS, CROWDPOSE_SIGMAS, SIGMAS


def test_oks_two_keypoints_hand_computed():
    sigmas = [0.1, 0.2]
    gt = np.array([[0.0, 0.0, 2.0], [10.0, 10.0, 2.0]])
    dt = np.array([[3.0, 4.0], [10.0, 10.0]])
    # keypoint 0: d^2 = 25, var = (2*0.1)^2 = 0.04, e = 25 / 0.04 / 100 / 2 = 3.125; keypoint 1: e = 0
    expected = (math.exp(-3.125) + 1.0) / 2
    assert oks(gt, dt, 100.0, sigmas) == pytest.approx(expected, rel=1e-12)
    # only ground-truth-visible keypoints count (COCOeval): hide the exact one
    gt[1, 2] = 0
    assert oks(gt, dt, 100.0, sigmas) == pytest.approx(math.exp(-3.125), rel=1e-12)
    # vis_thr=None: every keypoint counts (MMPose oks_nms)
    assert oks(gt, dt, 100.0, sigmas, vis_thr=None) == pytest.approx(expected, rel=1e-12)
    # nothing visible -> 0
    gt[:, 2] = 0
    assert oks(gt, dt, 100.0, sigmas) == 0.0


def test_oks_batched_and_matrix():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (3, 17, 2))
    b = rng.uniform(0, 100, (4, 17, 2))
    areas_a, areas_b = rng.uniform(500, 5000, 3), rng.uniform(500, 5000, 4)
    m = oks_matrix(a, b, areas_a, areas_b)
    assert m.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert m[i, j] == pytest.approx(oks(a[i], b[j], (areas_a[i] + areas_b[j]) / 2, vis_thr=None), rel=1e-12)
    m_gt = oks_matrix(a, b, areas_a, area_mode="a")
    assert m_gt[1, 2] == pytest.approx(oks(a[1], b[2], areas_a[1], vis_thr=None), rel=1e-12)


def test_default_sigmas():
    assert tuple(default_sigmas(17)) == COCO_SIGMAS
    assert tuple(default_sigmas(21)) == SIGMAS
    assert tuple(default_sigmas(14, "crowdpose")) == CROWDPOSE_SIGMAS
    with pytest.raises(ValueError):
        default_sigmas(5)


def test_oks_equals_pycocotools_computeoks(sample_data_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from bmp_lightning.metrics.cocotools import quiet

    with quiet():
        gt = COCO(str(sample_data_dir / "coco" / "test_coco.json"))
    img = 197388
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[img]))
    rng = np.random.default_rng(1)
    dts = []
    for n, a in enumerate(anns):
        k = np.array(a["keypoints"], float).reshape(17, 3)
        k[:, :2] += rng.normal(0, 4, (17, 2))
        k[:, 2] = 1
        dts.append({"image_id": img, "category_id": 1, "keypoints": k.reshape(-1).tolist(), "score": 1.0 - 0.1 * n})
    with quiet():
        ev = COCOeval(gt, gt.loadRes(dts), "keypoints")
        ev.params.imgIds = [img]
        ev.evaluate()
    ref = ev.ious[(img, 1)]  # (D, G), D sorted by score (already descending here)
    g = np.stack([np.array(a["keypoints"], float).reshape(17, 3) for a in anns])
    d = np.stack([np.array(x["keypoints"], float).reshape(17, 3) for x in dts])
    ours = oks_matrix(g, d, [a["area"] for a in anns], vis_thr=0.0, area_mode="a").T
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def _person(x0: float, y0: float) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([rng.uniform(0, 100, (17, 2)) + [x0, y0], np.ones((17, 1))], axis=1)


def test_oks_nms_hand_made():
    a = _person(0, 0)
    b = a.copy()
    b[:, :2] += 0.5  # near-identical to a
    c = _person(1000, 1000)  # far away
    kpts = np.stack([a, b, c])
    areas = np.array([10000.0, 10000.0, 10000.0])
    # b has the best score and suppresses a; c survives
    assert oks_nms(kpts, np.array([0.8, 0.9, 0.5]), areas, thr=0.9).tolist() == [1, 2]
    assert oks_nms(kpts, np.array([0.9, 0.8, 0.5]), areas, thr=0.9).tolist() == [0, 2]
    # ties: lower index first
    assert oks_nms(kpts, np.array([0.7, 0.7, 0.7]), areas, thr=0.9).tolist() == [0, 2]
    assert oks_nms(np.zeros((0, 17, 3)), np.zeros(0), np.zeros(0)).tolist() == []


def test_oks_nms_uses_mean_area():
    # one keypoint, sigma 0.5 -> var 1; d^2 = 40; areas 10 and 190 -> mean 100 -> e = 0.2, OKS = exp(-0.2) = 0.8187
    kpts = np.array([[[0.0, 0.0]], [[2.0, 6.0]]])
    areas = np.array([10.0, 190.0])
    scores = np.array([0.9, 0.8])
    assert math.exp(-0.2) == pytest.approx(0.8187, abs=1e-4)
    assert oks_nms(kpts, scores, areas, thr=0.81, sigmas=[0.5]).tolist() == [0]
    assert oks_nms(kpts, scores, areas, thr=0.82, sigmas=[0.5]).tolist() == [0, 1]
    # the first instance's area alone (10) would give exp(-2) = 0.135 and keep both at 0.81
    assert oks(kpts[0], kpts[1], 10.0, [0.5], vis_thr=None) == pytest.approx(math.exp(-2.0))
