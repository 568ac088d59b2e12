"""The BMP loop end to end with fake detector / pose / segmenter (docs/method.md#the-loop-step-by-step)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bmp_lightning.loop.bmp import BMP, BMPResult
from bmp_lightning.loop.config import bmp_d3, bmp_v1_exact

H, W = 120, 120
BOX_A = (10.0, 10.0, 50.0, 100.0)
BOX_B = (60.0, 10.0, 110.0, 100.0)


def _image() -> np.ndarray:
    rng = np.random.RandomState(0)
    img = rng.randint(60, 250, size=(H, W, 3)).astype(np.uint8)
    img[..., 0] = 240  # strongly non-grey, so BGR != RGB
    return img


def _box_mask(box) -> np.ndarray:
    m = np.zeros((H, W), bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = True
    return m


def _det(*items):
    """items: (box, score, label) -> detector dict."""
    return {
        "bboxes": np.array([i[0] for i in items], np.float32).reshape(-1, 4),
        "scores": np.array([i[1] for i in items], np.float32),
        "labels": np.array([i[2] for i in items], np.int64),
        "masks": np.stack([_box_mask(i[0]) for i in items]) if items else np.zeros((0, H, W), bool),
    }


class FakeDetector:
    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.seen: list[np.ndarray] = []

    def __call__(self, image):
        self.seen.append(image.copy())
        return self.outputs[min(len(self.seen), len(self.outputs)) - 1]


class FakePose:
    """17 keypoints on a 4x5 grid inside each box; the number of confident (0.9) keypoints per box is configurable."""

    def __init__(self, n_valid=None, k=17):
        self.n_valid = n_valid or {}
        self.k = k
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def pose(self, image, bboxes, masks=None):
        self.seen.append((image.copy(), np.array(bboxes), None if masks is None else np.array(masks)))
        kp = np.zeros((len(bboxes), self.k, 2))
        sc = np.full((len(bboxes), self.k), 0.1)
        for n, (x1, y1, x2, y2) in enumerate(bboxes):
            i = np.arange(self.k)
            kp[n, :, 0] = x1 + (x2 - x1) * ((i % 4) + 0.5) / 4
            kp[n, :, 1] = y1 + (y2 - y1) * ((i // 4) + 0.5) / 6
            sc[n, : self.n_valid.get(tuple(round(float(v)) for v in (x1, y1, x2, y2)), 12)] = 0.9
        return kp, sc


class FakeSegmenter:
    """Mask = the prompt points' bounding rectangle grown by 8 px; score 0.9 left of x=60, else 0.6."""

    def __init__(self):
        self.images: list[np.ndarray] = []
        self.calls: list[list[np.ndarray]] = []

    def set_image(self, image):
        self.images.append(image.copy())

    def predict(self, points, labels, boxes=None, **kwargs):
        self.calls.append([np.array(p) for p in points])
        masks = np.zeros((len(points), H, W), bool)
        scores = np.zeros(len(points), np.float32)
        for i, p in enumerate(points):
            x1, y1 = np.floor(p.min(0)).astype(int) - 8
            x2, y2 = np.ceil(p.max(0)).astype(int) + 8
            masks[i, max(y1, 0) : y2, max(x1, 0) : x2] = True
            scores[i] = 0.9 if p[:, 0].mean() < 60 else 0.6
        return masks, scores


def _filtering_outputs():
    iter1 = _det(
        (BOX_A, 0.9, 0),
        ((70, 10, 110, 100), 0.95, 1),  # not a person
        ((80, 20, 100, 40), 0.3, 0),  # score not > 0.3
        ((11, 10, 51, 100), 0.8, 0),  # box-NMS duplicate of A
    )
    return iter1


def test_iteration_two_detects_on_masked_image_and_pose_on_original():
    img = _image()
    det = FakeDetector([_filtering_outputs(), _det((BOX_A, 0.9, 0), (BOX_B, 0.85, 0))])
    pose = FakePose(n_valid={(10, 10, 50, 100): 12})
    seg = FakeSegmenter()
    res = BMP(det, pose, seg, loop="bmp_d3")(img, return_iterations=True)
    assert isinstance(res, BMPResult) and len(det.seen) == 2

    # iteration 1 kept only A (label, strict score and box NMS filters)
    it1 = res.iterations[0]
    np.testing.assert_allclose(it1.det_bboxes, [BOX_A])
    a1 = it1.persons[0]
    # iteration 2's detector input: A's refined mask painted black, the rest untouched
    np.testing.assert_array_equal(det.seen[0], img)
    assert (det.seen[1][a1.mask] == 0).all()
    np.testing.assert_array_equal(det.seen[1][~a1.mask], img[~a1.mask])
    np.testing.assert_array_equal(res.iterations[1].image, det.seen[1])
    # pose always on the original image, with the detector masks
    assert len(pose.seen) == 2
    for image, boxes, masks in pose.seen:
        np.testing.assert_array_equal(image, img)
        np.testing.assert_array_equal(masks, np.stack([_box_mask(b) for b in boxes]))
    # SAM embedding once per image, RGB in d3
    assert len(seg.images) == 1
    np.testing.assert_array_equal(seg.images[0], img)


def test_old_instance_wins_over_weaker_duplicate_and_exclusive_masks():
    img = _image()
    a_shift = (11.0, 10.0, 51.0, 100.0)  # A found again in iteration 2, fewer confident keypoints
    det = FakeDetector([_det((BOX_A, 0.9, 0)), _det((a_shift, 0.9, 0), (BOX_B, 0.85, 0))])
    pose = FakePose(n_valid={(10, 10, 50, 100): 12, (11, 10, 51, 100): 8, (60, 10, 110, 100): 12})
    for loop in ("bmp_d3", "bmp_v1_exact"):
        seg = FakeSegmenter()
        res = BMP(det.__class__(det.outputs), pose, seg, loop=loop)(img)
        assert [p.iteration for p in res.persons] == [1, 2]
        a, b = res.persons
        np.testing.assert_allclose(a.bbox, BOX_A)
        np.testing.assert_allclose(b.bbox, BOX_B)
        assert res.iterations[1].new_indices.tolist() == [1] and res.iterations[1].kept_old.tolist() == [0]
        # B's SAM rectangle overlaps A's; A (0.9) keeps the overlap, only the new mask changes
        assert not (a.mask & b.mask).any()
        raw_b = np.zeros((H, W), bool)
        pts = seg.calls[1][0]
        raw_b[int(np.floor(pts[:, 1].min())) - 8 : int(np.ceil(pts[:, 1].max())) + 8,
              int(np.floor(pts[:, 0].min())) - 8 : int(np.ceil(pts[:, 0].max())) + 8] = True  # fmt: skip
        np.testing.assert_array_equal(b.mask, raw_b & ~a.mask)
        np.testing.assert_array_equal(a.mask, res.iterations[0].persons[0].mask)
        # person fields
        assert a.score == pytest.approx((12 * 0.9 + 5 * 0.1) / 17)
        assert a.bbox_score == pytest.approx(0.9) and a.sam_score == pytest.approx(0.9)
        assert b.sam_score == pytest.approx(0.6) and len(b.prompts) == 6
        assert a.keypoints.shape == (17, 2) and a.keypoint_scores.shape == (17,)


def test_d3_vs_v1_exact_identical_duplicate_and_bgr():
    img = _image()
    outputs = [_det((BOX_A, 0.9, 0)), _det((BOX_A, 0.9, 0), (BOX_B, 0.85, 0))]
    results, segs = {}, {}
    for loop in ("bmp_d3", "bmp_v1_exact"):
        segs[loop] = FakeSegmenter()
        results[loop] = BMP(FakeDetector(outputs), FakePose(), segs[loop], loop=loop)(img)
    # identical duplicate: equal keypoint counts -> the argmax row (old A) is suppressed.
    # d3 removes it (A re-found in iteration 2); v1.1 keeps it next to the new copy.
    assert [p.iteration for p in results["bmp_d3"].persons] == [2, 2]
    assert [p.iteration for p in results["bmp_v1_exact"].persons] == [1, 2, 2]
    v1 = results["bmp_v1_exact"].persons
    np.testing.assert_allclose(v1[0].bbox, v1[1].bbox)
    # SAM input: RGB in d3, the BGR array in v1
    np.testing.assert_array_equal(segs["bmp_d3"].images[0], img)
    np.testing.assert_array_equal(segs["bmp_v1_exact"].images[0], img[..., ::-1])


def test_segmenter_none_uses_detector_masks(tmp_path):
    img = _image()
    outputs = [_det((BOX_A, 0.9, 0)), _det((BOX_B, 0.85, 0))]
    res = BMP(FakeDetector(outputs), FakePose(), None, loop=bmp_d3(segmenter="none"))(img)
    assert len(res.persons) == 2
    np.testing.assert_array_equal(res.persons[0].mask, _box_mask(BOX_A))
    np.testing.assert_array_equal(res.persons[1].mask, _box_mask(BOX_B))
    assert res.persons[1].sam_score == pytest.approx(0.85)  # ranked by detector score
    # a path works like the array
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), img[..., ::-1])
    res2 = BMP(FakeDetector(outputs), FakePose(), None, loop=bmp_d3(segmenter="none"))(path)
    np.testing.assert_array_equal(res2.arrays()["masks"], res.arrays()["masks"])


def test_missing_segmenter_and_empty_iterations():
    with pytest.raises(ValueError, match="segmenter=none"):
        BMP(FakeDetector([]), FakePose(), None, loop="bmp_d3")
    img = _image()
    det = FakeDetector([_det(), _det((BOX_A, 0.9, 0))])
    res = BMP(det, FakePose(), FakeSegmenter(), loop="bmp_d3")(img)
    assert res.iterations[0].skipped == "no detections"
    np.testing.assert_array_equal(det.seen[1], img)  # nothing painted after an empty iteration
    assert [p.iteration for p in res.persons] == [2]
    arr = res.arrays()
    assert arr["keypoints"].shape == (1, 17, 2) and arr["masks"].shape == (1, H, W)
    empty = BMP(FakeDetector([_det()]), FakePose(), FakeSegmenter())(img)
    assert empty.persons == [] and empty.arrays()["bboxes"].shape == (0, 4)


def test_timings_and_21_keypoints():
    img = _image()
    outputs = [_det((BOX_A, 0.9, 0)), _det((BOX_B, 0.85, 0))]
    res = BMP(FakeDetector(outputs), FakePose(k=21), FakeSegmenter(), loop="bmp_v1_exact")(img)
    assert res.persons[0].keypoints.shape == (21, 2)
    for it in res.iterations:
        assert set(it.timings) == {"detector", "pose", "sam", "total"}
        assert all(v >= 0 for v in it.timings.values())
        assert it.timings["total"] >= it.timings["detector"] + it.timings["pose"] + it.timings["sam"] - 1e-6
    assert res.timings["total"] == pytest.approx(sum(it.timings["total"] for it in res.iterations))
    assert res.iterations[0].image is None  # snapshots' images only with return_iterations=True


def test_empty_prompt_fallback():
    img = _image()
    outputs = [_det((BOX_A, 0.9, 0))]
    # no keypoint above 0.3: d3 keeps the detector mask, v1.1 prompts SAM with six (0, 0) points
    pose = FakePose(n_valid={(10, 10, 50, 100): 0})
    seg = FakeSegmenter()
    res = BMP(FakeDetector(outputs), pose, seg, loop=bmp_d3(num_iters=1))(img)
    np.testing.assert_array_equal(res.persons[0].mask, _box_mask(BOX_A))
    assert res.persons[0].sam_score == 0.0 and seg.calls == []
    seg = FakeSegmenter()
    res = BMP(FakeDetector(outputs), pose, seg, loop=bmp_v1_exact(num_iters=1))(img)
    np.testing.assert_array_equal(seg.calls[0][0], np.zeros((6, 2)))


def test_with_tiny_sam2():
    pytest.importorskip("transformers")
    from bmp_lightning.loop.segmenter import Sam2Segmenter

    img = _image()
    outputs = [_det((BOX_A, 0.9, 0)), _det((BOX_B, 0.85, 0))]
    res = BMP(FakeDetector(outputs), FakePose(), Sam2Segmenter.tiny_random(0), loop="bmp_d3")(img)
    assert len(res.persons) == 2
    assert all(p.mask.shape == (H, W) and p.mask.dtype == bool for p in res.persons)
    assert not (res.persons[0].mask & res.persons[1].mask).any()


def test_max_painted_overlap_drops_redetections_of_painted_people():
    img = _image()
    rim = (30.0, 10.0, 55.0, 100.0)  # mask: columns 30..54, of which 30..49 (20 of 25 = 0.8) are A's painted area
    outputs = [_det((BOX_A, 0.9, 0)), _det((rim, 0.8, 0), (BOX_B, 0.85, 0))]
    seen = {}
    for thr in (1.0, 0.8, 0.7):
        pose = FakePose()
        res = BMP(FakeDetector(outputs), pose, None, loop=bmp_d3(segmenter="none", max_painted_overlap=thr))(img)
        it2 = res.iterations[1]
        seen[thr] = sorted(tuple(b) for b in it2.det_bboxes.tolist())
        if thr < 0.8:  # 0.8 > 0.7: dropped before pose, never posed, not a person
            assert it2.painted_dropped == 1
            np.testing.assert_allclose(pose.seen[1][1], [BOX_B])
            assert [tuple(p.bbox) for p in res.persons] == [BOX_A, BOX_B]
        else:  # off (upstream), or exactly at the threshold: kept
            assert it2.painted_dropped == 0 and len(pose.seen[1][1]) == 2
            assert len(res.persons) == 3  # the rim's pose differs enough to pass OKS-NMS: the duplicate
    assert seen[1.0] == seen[0.8] == sorted([rim, BOX_B]) and seen[0.7] == [BOX_B]


def test_maskout_dilate_paints_a_rim():
    img = _image()
    outputs = [_det((BOX_A, 0.9, 0)), _det((BOX_B, 0.85, 0))]
    det = FakeDetector(outputs)
    BMP(det, FakePose(), None, loop=bmp_d3(segmenter="none", maskout_dilate=2))(img)
    painted = det.seen[1].sum(axis=2) == 0
    x1, y1, x2, y2 = (int(v) for v in BOX_A)
    grown = np.zeros((H, W), bool)
    grown[y1 - 2 : y2 + 2, x1 - 2 : x2 + 2] = True  # a 2-px ellipse keeps the box corners' diagonal pixels
    assert painted[y1 - 2 : y2 + 2, x1:x2].all() and painted[y1:y2, x1 - 2 : x2 + 2].all()
    assert not (painted & ~grown).any()
    with pytest.raises(ValueError, match="max_painted_overlap"):
        bmp_d3(max_painted_overlap=1.5)
