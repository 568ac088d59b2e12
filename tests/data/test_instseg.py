"""Instance-segmentation transforms: RemoveRandomInstances semantics and box/mask consistency of the geometry."""

from __future__ import annotations

import numpy as np
import pytest

from bmp_lightning.data.instseg_transforms import (
    MEAN_RGB,
    FilterAnnotations,
    Pad,
    RandomCrop,
    RandomFlip,
    RandomResize,
    RemoveRandomInstances,
    Resize,
    YOLOXHSVRandomAug,
    build_test_pipeline,
    build_train_pipeline,
    hflip_sample,
    masks_to_boxes,
    rescale_size,
)


def _toy(h: int = 60, w: int = 80, rects=((5, 5, 25, 40), (30, 10, 50, 55), (55, 2, 75, 30)), labels=None) -> dict:
    """Image with values in [10, 250] (never black) and rectangular people; boxes = tight mask boxes."""
    rng = np.random.default_rng(0)
    img = rng.integers(10, 251, size=(h, w, 3), dtype=np.uint8)
    masks = np.zeros((len(rects), h, w), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = 1
    boxes = np.array(rects, np.float32).reshape(-1, 4)
    labels = np.zeros(len(rects), np.int64) if labels is None else np.asarray(labels, np.int64)
    return {"img": img, "boxes": boxes, "labels": labels, "masks": masks}


def _removed_indices(before: dict, after: dict) -> list[int]:
    kept = [
        i for i in range(len(before["boxes"])) if any(np.array_equal(before["masks"][i], m) for m in after["masks"])
    ]
    return sorted(set(range(len(before["boxes"]))) - set(kept))


@pytest.mark.parametrize("seed", range(12))
def test_remove_random_instances_black(seed: int) -> None:
    s = _toy()
    out = RemoveRandomInstances(prob=1.0, fill="black")(s, np.random.default_rng(seed))
    removed = _removed_indices(s, out)
    kept = [i for i in range(3) if i not in removed]
    assert 1 <= len(removed) <= 2  # a non-empty proper subset
    region = s["masks"][removed].any(0)
    # exactly the removed people's pixels change, and to black
    assert (out["img"][region] == 0).all()
    np.testing.assert_array_equal(out["img"][~region], s["img"][~region])
    changed = (out["img"] != s["img"]).any(-1)
    np.testing.assert_array_equal(changed, region)
    # their targets are gone, the kept ones untouched and in order
    np.testing.assert_array_equal(out["boxes"], s["boxes"][kept])
    np.testing.assert_array_equal(out["masks"], s["masks"][kept])
    np.testing.assert_array_equal(out["labels"], s["labels"][kept])
    assert s["img"].min() >= 10  # the input sample is not modified in place


def test_remove_random_instances_subset_sizes_cover_proper_subsets() -> None:
    s = _toy(rects=((0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 30, 10), (30, 0, 40, 10)))
    t = RemoveRandomInstances(prob=1.0)
    sizes = {len(_removed_indices(s, t(s, np.random.default_rng(i)))) for i in range(200)}
    assert sizes == {1, 2, 3}  # never 0, never all 4


def test_remove_random_instances_identity_cases() -> None:
    s = _toy()
    assert RemoveRandomInstances(prob=0.0)(s, np.random.default_rng(0)) is s
    single = _toy(rects=((5, 5, 25, 40),))
    for i in range(20):
        assert RemoveRandomInstances(prob=1.0)(single, np.random.default_rng(i)) is single
    # one person and one non-person: a single eligible person -> untouched
    mixed = _toy(rects=((5, 5, 25, 40), (30, 10, 50, 55)), labels=[0, 3])
    for i in range(20):
        assert RemoveRandomInstances(prob=1.0, person_label=0)(mixed, np.random.default_rng(i)) is mixed
    # a person with an empty mask is not eligible either
    empty = _toy(rects=((5, 5, 25, 40), (30, 10, 30, 10)))
    assert RemoveRandomInstances(prob=1.0)(empty, np.random.default_rng(0)) is empty
    # probability: about half the images are touched with prob 0.5
    t = RemoveRandomInstances(prob=0.5)
    touched = sum(t(s, np.random.default_rng(i)) is not s for i in range(400))
    assert 150 < touched < 250


def test_remove_random_instances_mean_and_noise_fill() -> None:
    s = _toy()
    out = RemoveRandomInstances(prob=1.0, fill="mean")(s, np.random.default_rng(1))
    region = s["masks"][_removed_indices(s, out)].any(0)
    assert (out["img"][region] == np.array(MEAN_RGB, np.uint8)).all()
    np.testing.assert_array_equal(out["img"][~region], s["img"][~region])
    out = RemoveRandomInstances(prob=1.0, fill="noise")(s, np.random.default_rng(1))
    region = s["masks"][_removed_indices(s, out)].any(0)
    np.testing.assert_array_equal(out["img"][~region], s["img"][~region])
    assert (out["img"][region] != s["img"][region]).mean() > 0.9
    with pytest.raises(ValueError, match="fill"):
        RemoveRandomInstances(fill="white")


def test_remove_random_instances_dilate_spares_kept_people() -> None:
    # two touching people: dilation of the removed one must not paint over the kept one
    s = _toy(rects=((10, 10, 30, 50), (30, 10, 50, 50)))
    t = RemoveRandomInstances(prob=1.0, dilate=3)
    for seed in range(6):
        out = t(s, np.random.default_rng(seed))
        (r,) = _removed_indices(s, out)
        k = 1 - r
        kept_px = s["masks"][k].astype(bool)
        np.testing.assert_array_equal(out["img"][kept_px], s["img"][kept_px])
        painted = (out["img"] == 0).all(-1)
        assert painted[s["masks"][r].astype(bool)].all()
        # the ring grows 3 px on the free sides: e.g. above the removed person
        x1, y1, x2, y2 = (10, 10, 30, 50) if r == 0 else (30, 10, 50, 50)
        assert painted[y1 - 3 : y1, x1 + 3 : x2 - 3].all() and not painted[y1 - 4, (x1 + x2) // 2]


def test_rescale_size_hand_values() -> None:
    assert rescale_size(425, 640, (640, 640))[:2] == (425, 640)
    assert rescale_size(333, 500, (640, 640))[:2] == (int(333 * 1.28 + 0.5), 640) == (426, 640)
    assert rescale_size(100, 50, (1280, 1280))[:2] == (1280, 640)


def test_resize_by_two_keeps_boxes_equal_to_mask_boxes() -> None:
    s = _toy()
    out = Resize((160, 160), keep_ratio=True)(s)  # 60x80 -> factor min(160/80, 160/60) = 2
    assert out["img"].shape == (120, 160, 3) and out["masks"].shape == (3, 120, 160)
    assert out["scale_factor"] == (2.0, 2.0)
    np.testing.assert_array_equal(masks_to_boxes(out["masks"]), out["boxes"])
    np.testing.assert_array_equal(out["boxes"], s["boxes"] * 2)


@pytest.mark.parametrize("seed", range(5))
def test_random_resize_keeps_boxes_within_a_pixel_of_masks(seed: int) -> None:
    s = _toy()
    out = RandomResize((300, 300), (0.1, 2.0))(s, np.random.default_rng(seed))
    h, w = out["img"].shape[:2]
    assert out["masks"].shape[1:] == (h, w)
    nonempty = out["masks"].reshape(3, -1).any(1)
    np.testing.assert_allclose(masks_to_boxes(out["masks"])[nonempty], out["boxes"][nonempty], atol=1.0)


def test_crop_flip_pad_keep_boxes_equal_to_mask_boxes() -> None:
    s = _toy()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        out = RandomCrop((40, 50))(s, rng)
        assert out["img"].shape == (40, 50, 3)
        np.testing.assert_array_equal(masks_to_boxes(out["masks"]), out["boxes"])
        out = hflip_sample(out)
        np.testing.assert_array_equal(masks_to_boxes(out["masks"]), out["boxes"])
        out = Pad((64, 64), 114)(out)
        assert out["img"].shape == (64, 64, 3) and out["masks"].shape[1:] == (64, 64)
        assert (out["img"][40:] == 114).all() and (out["img"][:, 50:] == 114).all()
        np.testing.assert_array_equal(masks_to_boxes(out["masks"]), out["boxes"])


def test_crop_hand_case_and_negative_crop() -> None:
    s = _toy()
    # margins 20 (h) and 30 (w); draw the offsets from a known generator
    out = RandomCrop((40, 50))(s, np.random.default_rng(7))
    r = np.random.default_rng(7)
    oy, ox = int(r.integers(0, 21)), int(r.integers(0, 31))
    np.testing.assert_array_equal(out["img"], s["img"][oy : oy + 40, ox : ox + 50])
    expected = []
    for x1, y1, x2, y2 in s["boxes"]:
        b = np.clip([x1 - ox, y1 - oy, x2 - ox, y2 - oy], 0, [50, 40, 50, 40])
        if b[0] < 50 and b[1] < 40 and b[2] > 0 and b[3] > 0:
            expected.append(b)
    np.testing.assert_array_equal(out["boxes"], np.array(expected, np.float32))
    # a crop with nobody in it
    far = _toy(h=200, w=200, rects=((0, 0, 10, 10),))
    crop = RandomCrop((50, 50), allow_negative_crop=True)
    rng = np.random.default_rng(0)
    outs = [crop(far, rng) for _ in range(20)]
    assert any(o["boxes"].shape == (0, 4) and o["masks"].shape == (0, 50, 50) for o in outs)
    strict = RandomCrop((50, 50), allow_negative_crop=False)
    rng = np.random.default_rng(0)
    assert any(strict(far, rng) is None for _ in range(20))


def test_flip_hand_values() -> None:
    s = _toy()
    out = RandomFlip(1.0)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(out["boxes"][0], [80 - 25, 5, 80 - 5, 40])
    np.testing.assert_array_equal(out["img"], s["img"][:, ::-1])
    assert RandomFlip(0.0)(s, np.random.default_rng(0)) is s


def test_hsv_hand_values() -> None:
    class Fixed(YOLOXHSVRandomAug):
        def __init__(self, g):
            super().__init__()
            self.g = np.array(g, np.int16)

        def gains(self, rng):
            return self.g

    red = {"img": np.zeros((2, 2, 3), np.uint8) + np.array([255, 0, 0], np.uint8)}
    np.testing.assert_array_equal(Fixed([0, 0, -30])(red, None)["img"][0, 0], [225, 0, 0])  # value 255 -> 225
    np.testing.assert_array_equal(Fixed([60, 0, 0])(red, None)["img"][0, 0], [0, 255, 0])  # hue 0 -> 120 deg
    np.testing.assert_array_equal(Fixed([-60, 0, 0])(red, None)["img"][0, 0], [0, 0, 255])  # wraps to 240 deg
    g = YOLOXHSVRandomAug(5, 30, 30).gains(np.random.default_rng(0))
    assert g.dtype == np.int16 and abs(g[0]) <= 5 and abs(g[1]) <= 30 and abs(g[2]) <= 30


def test_filter_annotations() -> None:
    s = _toy(rects=((0, 0, 1, 10), (5, 5, 7, 7), (10, 10, 20, 11)))
    out = FilterAnnotations((1, 1))(s)
    np.testing.assert_array_equal(out["boxes"], [[5, 5, 7, 7]])  # w and h must be > 1
    assert FilterAnnotations((1, 1))(_toy(rects=((0, 0, 1, 10),))) is None  # all gone -> draw another sample
    empty = _toy(rects=())
    assert FilterAnnotations((1, 1))(empty) is empty


def test_train_pipeline_end_to_end_consistent() -> None:
    s = _toy(h=300, w=400, rects=((20, 30, 120, 280), (150, 40, 260, 290), (280, 10, 390, 200)))
    for stage in (1, 2):
        p = build_train_pipeline(stage=stage, input_size=128, scale=256, remove_prob=0.5)
        assert ("RemoveRandomInstances" in repr(p)) == (stage == 1)
        rng = np.random.default_rng(3)
        n_ok = 0
        for _ in range(15):
            out = p(s, rng)
            if out is None:
                continue
            n_ok += 1
            assert out["img"].shape == (128, 128, 3) and out["img"].dtype == np.uint8
            assert out["masks"].shape == (len(out["boxes"]), 128, 128) and len(out["labels"]) == len(out["boxes"])
            np.testing.assert_array_equal(masks_to_boxes(out["masks"]), out["boxes"])
            wh = out["boxes"][:, 2:] - out["boxes"][:, :2]
            assert (wh > 1).all()
        assert n_ok > 5


def test_test_pipeline_resize_and_pad() -> None:
    s = _toy(h=333, w=500, rects=((100, 100, 200, 300),))
    out = build_test_pipeline(640, 114)(s, None)
    assert out["img"].shape == (640, 640, 3)
    assert out["img_shape"] == (426, 640)
    assert out["scale_factor"] == (640 / 500, 426 / 333)
    assert (out["img"][426:] == 114).all() and not (out["img"][425] == 114).all()
    np.testing.assert_allclose(out["boxes"][0], [128, 100 * 426 / 333, 256, 300 * 426 / 333], rtol=1e-6)
