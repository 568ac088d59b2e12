"""Exclusive masks, mask-out (contours vs pixels) and box NMS (docs/method.md#the-loop-step-by-step steps 1, 5, 7)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bmp_lightning.data.instseg_transforms import RemoveRandomInstances
from bmp_lightning.loop.bmp import BMP
from bmp_lightning.loop.config import bmp_d3
from bmp_lightning.structures.mask_ops import box_nms, exclusive_masks, mask_out, painted_region
from tests.loop.test_bmp import FakeDetector, FakePose


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_exclusive_masks_overlap_goes_to_higher_score():
    a = _rect(10, 10, 0, 6, 0, 6)
    b = _rect(10, 10, 3, 9, 3, 9)
    out = exclusive_masks(np.stack([a, b]), np.array([0.5, 0.9]))
    overlap = a & b
    assert overlap.sum() == 9
    assert not out[0][overlap].any() and out[1][overlap].all()
    np.testing.assert_array_equal(out[0], a & ~b)
    np.testing.assert_array_equal(out[1], b)
    assert not (out[0] & out[1]).any()
    # uncovered pixels stay empty
    assert not out[:, ~(a | b)].any()


def test_exclusive_masks_ties_and_scores_below_zero():
    a = _rect(4, 4, 0, 4, 0, 2)
    b = _rect(4, 4, 0, 4, 1, 4)
    out = exclusive_masks(np.stack([a, b]), np.array([0.7, 0.7]))
    assert out[0][:, 1].all() and not out[1][:, 1].any()  # tie -> first mask
    # A pixel covered by a single mask goes to it whatever its score (no argmax over non-covering masks).
    out = exclusive_masks(np.stack([a, b]), np.array([-1.0, 0.0]))
    np.testing.assert_array_equal(out[0], a & ~b)
    np.testing.assert_array_equal(out[1], b)
    assert exclusive_masks(np.zeros((0, 4, 4), bool), np.zeros(0)).shape == (0, 4, 4)


def test_mask_out_contours_fill_holes_pixels_do_not():
    img = np.full((40, 40, 3), 200, np.uint8)
    ring = _rect(40, 40, 5, 25, 5, 25) & ~_rect(40, 40, 12, 18, 12, 18)  # 20x20 square with a 6x6 hole
    out_c = mask_out(img, ring[None], mode="contours")
    out_p = mask_out(img, ring[None], mode="pixels")
    assert (out_c[5:25, 5:25] == 0).all()  # hole painted too
    assert (out_p[12:18, 12:18] == 200).all()  # hole kept
    assert (out_p[ring] == 0).all()
    assert (out_c[~_rect(40, 40, 5, 25, 5, 25)] == 200).all() and (out_p[~ring] == 200).all()
    assert (img == 200).all()  # input untouched


def test_mask_out_small_contours_skipped():
    img = np.full((40, 40, 3), 200, np.uint8)
    # 8x8 block: contour through pixel centres is a 7x7 square, area 49 < 50 -> skipped; 9x9 -> 64 -> painted.
    small = _rect(40, 40, 2, 10, 2, 10)
    big = _rect(40, 40, 20, 29, 20, 29)
    out = mask_out(img, np.stack([small | big]), mode="contours", min_area=50)
    assert (out[small] == 200).all()
    assert (out[big] == 0).all()
    out = mask_out(img, np.stack([small]), mode="pixels")
    assert (out[small] == 0).all()
    out = mask_out(img, np.stack([small]), mode="contours", min_area=10, fill=(1, 2, 3))
    assert (out[small] == [1, 2, 3]).all()


def test_box_nms_plus_one_and_threshold():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], float)
    scores = np.array([0.9, 0.8, 0.7])
    # IoU: continuous 50/150 = 0.333; "+1": 66/(121+121-66) = 0.375
    assert box_nms(boxes, scores, iou=0.35, plus_one=False).tolist() == [0, 1, 2]
    assert box_nms(boxes, scores, iou=0.35, plus_one=True).tolist() == [0, 2]
    # overlap equal to the threshold is kept (suppress only IoU > thr)
    assert box_nms(boxes, scores, iou=50 / 150, plus_one=False).tolist() == [0, 1, 2]
    # visiting order is by score
    assert box_nms(boxes, np.array([0.1, 0.8, 0.7]), iou=0.3, plus_one=True).tolist() == [1, 2]
    assert box_nms(np.zeros((0, 4)), np.zeros(0)).size == 0


@pytest.mark.parametrize("mode", ["bad"])
def test_mask_out_bad_mode(mode):
    with pytest.raises(ValueError, match="contours"):
        mask_out(np.zeros((4, 4, 3), np.uint8), np.ones((1, 4, 4), bool), mode=mode)


def test_mask_out_dilate_grows_by_radius():
    img = np.full((40, 40, 3), 200, np.uint8)
    dot = _rect(40, 40, 20, 21, 20, 21)  # one pixel at (20, 20)
    region = painted_region(dot[None], (40, 40), mode="pixels", dilate=3)
    yy, xx = np.mgrid[:40, :40]
    # cv2's 7x7 ellipse: the disc of radius 3 (corners of the square off, the 4 axis tips on)
    assert region[20, 17] and region[20, 23] and region[17, 20] and region[23, 20]
    assert not region[17, 17] and not region[20, 24]
    assert region.sum() == cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)).sum()
    assert (np.hypot(yy - 20, xx - 20)[region] <= 3.2).all()
    out = mask_out(img, dot[None], mode="pixels", dilate=3)
    np.testing.assert_array_equal(out[..., 0] == 0, region)
    # dilate=0 is the upstream mask-out, contours mode included
    np.testing.assert_array_equal(painted_region(dot[None], (40, 40), "pixels"), dot)
    with pytest.raises(ValueError, match=">= 0"):
        painted_region(dot[None], (40, 40), dilate=-1)


def _ellipse(hw, center, axes) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    cv2.ellipse(m, center, axes, 0, 0, 360, 1, -1)
    return m.astype(bool)


@pytest.mark.parametrize("dilate", [0, 3])
def test_training_and_inference_mask_out_paint_the_same_pixels(dilate):
    """Detector training (``RemoveRandomInstances``) and the BMP loop (``loop.maskout=pixels``) paint the same pixels
    for the same people: both go through :func:`mask_out`, so the holes the detector learns to ignore are the holes
    the loop paints. The one difference is by design: the training growth spares the people who stay visible."""
    hw = (120, 160)
    rng = np.random.default_rng(0)
    img = rng.integers(30, 250, size=(*hw, 3), dtype=np.uint8)
    # four people, two of them touching (so a grown hole would reach into a neighbour)
    masks = np.stack([_ellipse(hw, c, a) for c, a in [((30, 60), (14, 40)), ((55, 60), (12, 38)),
                                                        ((100, 50), (15, 30)), ((135, 70), (12, 35))]])  # fmt: skip
    boxes = np.array([[x.min(), y.min(), x.max() + 1, y.max() + 1] for y, x in (np.nonzero(m) for m in masks)], float)
    sample = {"img": img, "masks": masks, "labels": np.zeros(4, np.int64), "boxes": boxes}
    out = RemoveRandomInstances(prob=1.0, fill="black", dilate=dilate)(sample, np.random.default_rng(3))
    removed = [i for i in range(4) if not any((m == masks[i]).all() for m in out["masks"])]
    kept = [i for i in range(4) if i not in removed]
    assert removed and kept

    # the loop finds exactly the removed people in iteration 1 and paints them before iteration 2
    found = {"bboxes": boxes[removed].astype(np.float32), "scores": np.full(len(removed), 0.9, np.float32),
             "labels": np.zeros(len(removed), np.int64), "masks": masks[removed]}  # fmt: skip
    none = {"bboxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
            "labels": np.zeros(0, np.int64), "masks": np.zeros((0, *hw), bool)}  # fmt: skip
    det = FakeDetector([found, none])
    loop = bmp_d3(segmenter="none", maskout="pixels", maskout_dilate=dilate)
    res = BMP(det, FakePose(), None, loop=loop)(img)
    assert len(res.persons) == len(removed)
    loop_img = det.seen[1]

    spared = masks[kept].any(axis=0) & ~masks[removed].any(axis=0)  # training never grows a hole into a visible person
    np.testing.assert_array_equal(out["img"][~spared], loop_img[~spared])
    np.testing.assert_array_equal(out["img"][spared], img[spared])
    painted = (loop_img != img).any(axis=2)
    assert painted.sum() >= masks[removed].any(axis=0).sum() * 0.95  # the test paints something
    if dilate == 0:
        np.testing.assert_array_equal(out["img"], loop_img)
    # both are mask_out with the loop's arguments
    direct = mask_out(img, masks[removed], "pixels", fill=0, dilate=dilate, protect=masks[kept])
    np.testing.assert_array_equal(direct, out["img"])
