"""Top-down transforms: UDP warp round trips, flip symmetry, MaskBackground, mask perturbations, half-body,
bbox jitter, determinism, and the pipelines on real COCO samples."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bmp_lightning.data.codec import UDPHeatmap, flip_heatmaps, keypoints_to_image
from bmp_lightning.data.mask_perturb import (
    BRANCHES,
    enlarge_by_morphology,
    morph_kernel_sizes,
    perturb_mask,
    remove_voronoi_cells,
    shrink_by_morphology,
)
from bmp_lightning.data.pipeline import Compose, build_pose_pipeline
from bmp_lightning.data.transforms import (
    GenerateTarget,
    GetBBoxCenterScale,
    MaskBackground,
    RandomBBoxTransform,
    RandomFlip,
    RandomHalfBody,
    TopdownAffine,
    affine_points,
    fix_aspect_ratio,
    get_udp_warp_matrix,
    truncated_normal,
)
from bmp_lightning.structures.keypoints import COCO_FLIP_INDICES, FLIP_INDICES
from bmp_lightning.structures.records import BadSampleError


def make_sample(k: int = 21, bbox=(100.0, 60.0, 260.0, 400.0), seed: int = 0, h: int = 480, w: int = 640) -> dict:
    """A textured image with a box, keypoints inside it and an elliptic mask."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = bbox
    kpts = rng.uniform([x1 + 5, y1 + 5], [x2 - 5, y2 - 5], size=(k, 2)).astype(np.float32)
    vis = np.ones(k, np.float32)
    vis[rng.choice(k, 3, replace=False)] = 0
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        mask, (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int((x2 - x1) / 2), int((y2 - y1) / 2)), 0, 0, 360, 1, -1
    )
    return {
        "img": img,
        "bbox": np.array(bbox, np.float32),
        "keypoints": kpts,
        "keypoints_visible": vis,
        "mask": mask,
        "where": f"synthetic seed {seed}",
    }


# ---------------------------------------------------------------------------------------------- warp geometry
def test_udp_warp_maps_box_edges_to_first_and_last_pixel():
    mat = get_udp_warp_matrix((300.0, 200.0), (150.0, 200.0), 0.0, (192, 256))
    corners = np.array([[225.0, 100.0], [375.0, 300.0], [300.0, 200.0]])
    np.testing.assert_allclose(affine_points(corners, mat), [[0, 0], [191, 255], [95.5, 127.5]], atol=1e-9)
    # rotation turns about the box center: the center still lands on the crop center
    rot = get_udp_warp_matrix((300.0, 200.0), (150.0, 200.0), 30.0, (192, 256))
    np.testing.assert_allclose(affine_points(corners[2:], rot), [[95.5, 127.5]], atol=1e-9)


def test_fix_aspect_ratio_enlarges_short_side():
    np.testing.assert_allclose(fix_aspect_ratio(np.array([375.0, 125.0]), 0.75), [375.0, 500.0])  # wide
    np.testing.assert_allclose(fix_aspect_ratio(np.array([60.0, 400.0]), 0.75), [300.0, 400.0])  # tall


@pytest.mark.parametrize("bbox", [(100.0, 60.0, 260.0, 400.0), (50.0, 200.0, 600.0, 300.0), (10.5, 20.25, 40.5, 35.0)])
def test_affine_then_inverse_is_identity(bbox):
    sample = make_sample(bbox=bbox)
    out = Compose([GetBBoxCenterScale(), TopdownAffine()])(sample, np.random.default_rng(0))
    assert out["img"].shape == (256, 192, 3) and out["mask"].shape == (256, 192)
    # final scale = box * 1.25 with the short side enlarged to 3:4
    x1, y1, x2, y2 = bbox
    np.testing.assert_allclose(out["bbox_scale"], fix_aspect_ratio(np.array([x2 - x1, y2 - y1]) * 1.25, 0.75), 1e-5)
    np.testing.assert_allclose(out["bbox_center"], [(x1 + x2) / 2, (y1 + y2) / 2], rtol=1e-6)
    back = keypoints_to_image(out["keypoints"][None].astype(np.float64), out["bbox_center"][None],
                              out["bbox_scale"][None])[0]  # fmt: skip
    assert np.abs(back - sample["keypoints"]).max() < 1e-3


def test_rotated_affine_inverts_with_the_inverse_matrix():
    sample = make_sample()
    sample["bbox_rotation"] = 0.0
    t = Compose([GetBBoxCenterScale(), RandomBBoxTransform(shift_prob=1, rotate_prob=1), TopdownAffine()])
    out = t(sample, np.random.default_rng(3))
    assert out["bbox_rotation"] != 0
    inv = cv2.invertAffineTransform(out["warp_mat"].astype(np.float64))
    assert np.abs(affine_points(out["keypoints"], inv) - sample["keypoints"]).max() < 2e-3


def test_affine_image_content():
    # a crop with rotation 0 samples the image at the inverse-mapped positions (bilinear)
    sample = make_sample(bbox=(200.0, 100.0, 392.0, 356.0))
    yy, xx = np.mgrid[0:480, 0:640]
    sample["img"] = np.stack([xx % 256, yy % 256, (xx // 4) % 256], -1).astype(np.uint8)
    out = Compose([GetBBoxCenterScale(padding=1.0), TopdownAffine(padding=1.0)])(sample, np.random.default_rng(0))
    # the box is exactly 192x256 -> scale (192, 256): crop pixel u <-> image x = 200 + u * 192/191
    u, v = 50, 70
    x, y = 200 + u * 192 / 191 - 0.0, 100 + v * 256 / 255
    expect = np.array([x % 256, y % 256, (x / 4) % 256])
    np.testing.assert_allclose(out["img"][v, u].astype(float), expect, atol=1.01)


# ---------------------------------------------------------------------------------------------- flip
def test_double_flip_is_identity():
    sample = Compose([GetBBoxCenterScale()])(make_sample(), np.random.default_rng(0))
    flip = RandomFlip(prob=1.0)
    twice = flip(flip(dict(sample), np.random.default_rng(0)), np.random.default_rng(0))
    for key in ("img", "mask", "keypoints_visible"):
        np.testing.assert_array_equal(twice[key], sample[key])
    for key in ("bbox", "keypoints", "bbox_center"):
        np.testing.assert_allclose(twice[key], sample[key], atol=1e-9)


def test_flip_hand_computed():
    sample = make_sample(k=17, bbox=(100.0, 60.0, 260.0, 400.0))
    out = RandomFlip(prob=1.0)(dict(sample), np.random.default_rng(0))
    np.testing.assert_allclose(out["bbox"], [639 - 260, 60, 639 - 100, 400])
    np.testing.assert_allclose(out["keypoints"][2, 0], 639 - sample["keypoints"][1, 0], rtol=1e-6)  # right eye <- left
    np.testing.assert_array_equal(out["img"][:, 0], sample["img"][:, 639])
    assert out["flip"] is True
    assert RandomFlip(prob=0.0)(dict(sample), np.random.default_rng(0))["flip"] is False


@pytest.mark.parametrize("k,flip_indices", [(21, FLIP_INDICES), (17, COCO_FLIP_INDICES)])
def test_flipped_sample_heatmaps_are_mirrored_heatmaps(k, flip_indices):
    sample = make_sample(k=k, bbox=(137.3, 81.9, 301.7, 388.2))

    def run(prob: float) -> dict:
        pipe = Compose([GetBBoxCenterScale(), RandomFlip(prob), TopdownAffine(), GenerateTarget(UDPHeatmap())])
        return pipe(sample, np.random.default_rng(0))

    plain, flipped = run(0.0), run(1.0)
    np.testing.assert_allclose(flipped["heatmaps"], flip_heatmaps(plain["heatmaps"], flip_indices), atol=1e-5)
    np.testing.assert_array_equal(flipped["keypoint_weights"], plain["keypoint_weights"][list(flip_indices)])
    # the crop itself is mirrored too (up to OpenCV's fixed-point bilinear rounding)
    diff = np.abs(flipped["img"].astype(int) - plain["img"][:, ::-1].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5


# ---------------------------------------------------------------------------------------------- MaskBackground
def test_mask_background_values():
    vals = np.arange(256, dtype=np.uint8)
    img = np.stack([np.tile(vals, (4, 1))] * 3, -1)  # (4, 256, 3), every value on every row
    mask = np.zeros((4, 256), np.uint8)
    mask[:2] = 1
    sample = {"img": img, "mask": mask}
    out = MaskBackground(alpha=0.2)(dict(sample), np.random.default_rng(0))
    np.testing.assert_array_equal(out["img"][:2], img[:2])  # foreground unchanged
    np.testing.assert_array_equal(out["img"][2:], np.round(0.8 * img[2:].astype(float)).astype(np.uint8))
    assert out["img"][3, 255, 0] == 204 and out["img"][3, 100, 0] == 80
    assert sample["img"] is img and img[3, 255, 0] == 255  # the caller's image is untouched


def test_mask_background_missing_mask():
    sample = {"img": np.zeros((4, 4, 3), np.uint8), "mask": None, "where": "ann.json, id=7"}
    with pytest.raises(BadSampleError, match="ann.json, id=7"):
        MaskBackground()(dict(sample), np.random.default_rng(0))
    out = MaskBackground(continue_on_failure=True)(dict(sample), np.random.default_rng(0))
    assert out["img"] is sample["img"]
    with pytest.raises(BadSampleError, match="does not match"):
        MaskBackground()({"img": np.zeros((4, 4, 3), np.uint8), "mask": np.ones((3, 4), np.uint8)}, None)


# ---------------------------------------------------------------------------------------------- mask perturbation
def _square_mask(side: int, size: int = 400) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    o = (size - side) // 2
    m[o : o + side, o : o + side] = 1
    return m


def test_morph_kernel_sizes():
    assert morph_kernel_sizes(0) == (5, 5)
    assert morph_kernel_sizes(14_999) == (14, 5)
    assert morph_kernel_sizes(40_000) == (40, 13)
    assert morph_kernel_sizes(90_000) == (90, 30)


@pytest.mark.parametrize("side,k_small", [(100, 5), (200, 13)])
def test_area_scaled_morphology_on_a_square(side, k_small):
    # a square survives open/close of any smaller kernel; erode/dilate by a k-square change the side by k - 1
    m = _square_mask(side)
    assert morph_kernel_sizes(side * side)[1] == k_small
    assert shrink_by_morphology(m).sum() == (side - k_small + 1) ** 2
    assert enlarge_by_morphology(m).sum() == (side + k_small - 1) ** 2


def test_voronoi_cells():
    m = _square_mask(100, 200)
    rng = np.random.default_rng(0)
    removed = [remove_voronoi_cells(m, rng, amount=0.5, num_cells=10) for _ in range(20)]
    assert all(((r > 0) <= (m > 0)).all() for r in removed)  # only deletes
    assert any(r.sum() < m.sum() for r in removed) and any(r.sum() == m.sum() for r in removed)
    # at most 4 of 10 cells go, so at least ~6/10 of the area is left (cells are roughly equal)
    assert min(r.sum() for r in removed) > 0.3 * m.sum()
    with pytest.raises(ValueError, match="cannot seed"):
        remove_voronoi_cells(_square_mask(3, 20), rng, 0.5, 10)


def test_perturb_mask_binary_and_every_branch_reachable():
    m = np.zeros((240, 320), np.uint8)
    cv2.ellipse(m, (160, 120), (60, 100), 0, 0, 360, 1, -1)
    cv2.rectangle(m, (60, 100), (260, 110), 1, -1)  # thin "arms"
    seen: dict[str, list[int]] = {b: [] for b in BRANCHES}
    for seed in range(40):
        out, branch = perturb_mask(m, np.random.default_rng(seed), return_branch=True)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1} and out.shape == m.shape
        seen[branch].append(int(out.sum()))
    assert all(len(v) > 0 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    area = int(m.sum())
    assert max(seen["shrink_morphology"]) < area and min(seen["enlarge_morphology"]) > area
    assert max(seen["shrink_patches"]) <= area + 50 and min(seen["enlarge_patches"]) >= area - 50
    # no perturbation when both probabilities are 0
    out, branch = perturb_mask(m, np.random.default_rng(0), erode_prob=0, dilate_prob=0, return_branch=True)
    assert branch is None and np.array_equal(out, m)
    # a mask too small for the patch seeds is left to the 5x5 open/close, never an error
    tiny = np.zeros((50, 50), np.uint8)
    tiny[10:13, 10:13] = 1
    for seed in range(8):
        assert set(np.unique(perturb_mask(tiny, np.random.default_rng(seed)))) <= {0, 1}


def test_mask_background_with_perturbation_is_deterministic():
    sample = make_sample()
    t = MaskBackground(perturb=True)
    a = t(dict(sample), np.random.default_rng(5))
    b = t(dict(sample), np.random.default_rng(5))
    np.testing.assert_array_equal(a["img"], b["img"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert set(np.unique(a["mask"])) <= {0, 1}


# ---------------------------------------------------------------------------------------------- half-body, jitter
def test_half_body_hand_computed():
    # 21 keypoints, all visible; upper ids at y = 100..140, lower ids at y = 300..360
    kpts = np.zeros((21, 2), np.float32)
    kpts[:, 0] = 200 + np.arange(21)
    upper = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 18, 19]
    kpts[upper, 1] = np.linspace(100, 140, len(upper))
    lower = [11, 12, 13, 14, 15, 16, 20]
    kpts[lower, 1] = np.linspace(300, 360, len(lower))
    sample = {"keypoints": kpts, "keypoints_visible": np.ones(21, np.float32), "bbox": np.array([150.0, 90, 260, 370])}
    t = RandomHalfBody(prob=1.0, upper_prioritized_prob=1.0)
    out = t(dict(sample), np.random.default_rng(0))
    assert out["half_body"]
    pts = kpts[upper].astype(np.float64)
    c, s = pts.mean(0), (pts.max(0) - pts.min(0)) * 1.5
    expect = np.array([c[0] - s[0] / 2, max(c[1] - s[1] / 2, 90.0), c[0] + s[0] / 2, c[1] + s[1] / 2])
    np.testing.assert_allclose(out["bbox"], expect)
    # lower half, clipped at the original box bottom (370)
    out = RandomHalfBody(prob=1.0, upper_prioritized_prob=0.0)(dict(sample), np.random.default_rng(0))
    assert out["bbox"][3] == 370.0 and out["bbox"][1] > 200
    # too few visible keypoints: untouched
    few = dict(sample, keypoints_visible=np.r_[np.ones(8), np.zeros(13)].astype(np.float32))
    assert not t(few, np.random.default_rng(0))["half_body"]


def test_half_body_box_inside_original_box():
    t = RandomHalfBody(prob=1.0)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        k = 17 if seed % 2 else 21
        bbox = np.array([50.0, 40.0, 250.0, 420.0])
        kpts = rng.uniform([0, 0], [300, 460], size=(k, 2))  # some keypoints even outside the box
        sample = {"keypoints": kpts, "keypoints_visible": (rng.random(k) > 0.2).astype(np.float32), "bbox": bbox}
        out = t(dict(sample), rng)
        b = out["bbox"]
        assert b[0] >= 50 and b[1] >= 40 and b[2] <= 250 and b[3] <= 420 and (b[2:] >= b[:2]).all()


def test_truncated_normal_bounds_and_spread():
    x = truncated_normal(np.random.default_rng(0), 100_000)
    assert x.min() >= -1 and x.max() <= 1
    assert abs(x.mean()) < 0.01
    assert x.std() == pytest.approx(0.5396, abs=0.005)  # sd of N(0, 1) truncated to [-1, 1]


def test_bbox_transform_ranges():
    t = RandomBBoxTransform(shift_prob=1.0, scale_prob=1.0, rotate_prob=1.0)
    draws = [t.draw(np.random.default_rng(s)) for s in range(300)]
    offsets = np.array([d[0] for d in draws])
    scales = np.array([d[1] for d in draws])
    rots = np.array([d[2] for d in draws])
    assert np.abs(offsets).max() <= 0.16 and scales.min() >= 0.5 and scales.max() <= 1.5
    assert np.abs(rots).max() <= 80 and np.abs(rots).max() > 50
    # applied to the unpadded box: center moves by offset * size, size scales
    sample = {"bbox": np.array([100.0, 100.0, 200.0, 300.0])}
    out = t(dict(sample), np.random.default_rng(7))
    off, sc, rot = t.draw(np.random.default_rng(7))
    np.testing.assert_allclose(0.5 * (out["bbox"][:2] + out["bbox"][2:]), [150 + off[0] * 100, 200 + off[1] * 200])
    np.testing.assert_allclose(out["bbox"][2:] - out["bbox"][:2], [100 * sc, 200 * sc])
    np.testing.assert_allclose(out["bbox_scale"], [125 * sc, 250 * sc])
    assert out["bbox_rotation"] == rot
    # with all probabilities 0 nothing changes
    none = RandomBBoxTransform(shift_prob=0, scale_prob=0, rotate_prob=0)(dict(sample), np.random.default_rng(0))
    np.testing.assert_allclose(none["bbox"], sample["bbox"])
    assert none["bbox_rotation"] == 0


# ---------------------------------------------------------------------------------------------- pipelines
def test_train_pipeline_deterministic_and_shapes():
    pipe = build_pose_pipeline(train=True, use_mask=True)
    sample = make_sample()
    before = {k: v.copy() for k, v in sample.items() if isinstance(v, np.ndarray)}
    a = pipe(sample, np.random.default_rng(11))
    b = pipe(sample, np.random.default_rng(11))
    c = pipe(sample, np.random.default_rng(12))
    for key in ("img", "heatmaps", "keypoint_weights", "keypoints", "bbox_center", "bbox_scale", "warp_mat"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["img"], c["img"])
    assert a["img"].shape == (256, 192, 3) and a["img"].dtype == np.uint8
    assert a["heatmaps"].shape == (21, 64, 48) and a["heatmaps"].dtype == np.float32
    assert a["keypoint_weights"].shape == (21,) and a["keypoint_weights"].dtype == np.float32
    for k, v in before.items():  # the caller's sample is untouched
        np.testing.assert_array_equal(sample[k], v)
    with pytest.raises(BadSampleError):
        pipe(dict(sample, mask=None), np.random.default_rng(0))
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["GetBBoxCenterScale", "MaskBackground", "RandomFlip", "RandomHalfBody", "RandomBBoxTransform",
                     "TopdownAffine", "PhotometricAug", "GenerateTarget"]  # fmt: skip
    val = build_pose_pipeline(train=False, use_mask=True)
    assert [type(t).__name__ for t in val.transforms] == ["GetBBoxCenterScale", "MaskBackground", "TopdownAffine"]
    assert not val.transforms[1].perturb


def _coco_samples(data_dir: Path):
    from bmp_lightning.structures.io import read_image
    from bmp_lightning.structures.masks import segmentation_to_mask

    root = data_dir / "coco"
    if not (root / "test_coco.json").is_file():
        pytest.skip("coco sample annotations not found in the shared data folder")
    ann = json.loads((root / "test_coco.json").read_text())
    images = {im["id"]: im for im in ann["images"]}
    for a in ann["annotations"]:
        if a.get("iscrowd") or a["num_keypoints"] < 8:
            continue
        im = images[a["image_id"]]
        img = read_image(root / im["file_name"])
        kp = np.array(a["keypoints"], np.float32).reshape(17, 3)
        x, y, w, h = a["bbox"]
        yield {
            "img": img,
            "bbox": np.array([x, y, x + w, y + h], np.float32),
            "keypoints": kp[:, :2],
            "keypoints_visible": np.minimum(kp[:, 2], 1),
            "mask": segmentation_to_mask(a["segmentation"], im["height"], im["width"]),
            "where": f"test_coco.json, id={a['id']}",
        }


def test_pipelines_on_real_coco_samples(sample_data_dir):
    samples = list(_coco_samples(sample_data_dir))
    assert samples, "no usable COCO sample"
    codec = UDPHeatmap()
    val = build_pose_pipeline(train=False, use_mask=True, val_targets=True)
    train = build_pose_pipeline(train=True, use_mask=True)
    for i, s in enumerate(samples[:4]):
        out = val(s, np.random.default_rng(i))
        vis = s["keypoints_visible"] > 0
        # GT keypoints lie inside the 1.25x padded crop
        kin = out["keypoints"][vis]
        assert (kin >= 0).all() and (kin[:, 0] <= 191).all() and (kin[:, 1] <= 255).all()
        # the background is dimmed, the person is not: compare with the unmasked crop
        plain = build_pose_pipeline(train=False, use_mask=False)(s, np.random.default_rng(i))
        # (bilinear sampling mixes the two at the outline, so compare away from it)
        fg = cv2.erode(out["mask"], np.ones((3, 3), np.uint8)) > 0
        bg = cv2.dilate(out["mask"], np.ones((3, 3), np.uint8)) == 0
        assert np.abs(out["img"][fg].astype(int) - plain["img"][fg].astype(int)).max() <= 1
        ratio = out["img"][bg].astype(float) / np.maximum(plain["img"][bg].astype(float), 1)
        assert np.median(ratio[plain["img"][bg] > 50]) == pytest.approx(0.8, abs=0.01)
        # targets -> decode -> image pixels recovers the annotation (sub-pixel)
        kp, _ = codec.decode(torch.from_numpy(out["heatmaps"])[None])
        back = keypoints_to_image(kp.double(), torch.from_numpy(out["bbox_center"])[None].double(),
                                  torch.from_numpy(out["bbox_scale"])[None].double())[0].numpy()  # fmt: skip
        px_per_crop_px = out["bbox_scale"][0] / 191
        assert np.abs(back[vis] - s["keypoints"][vis]).max() < 0.05 * px_per_crop_px
        # train pipeline: deterministic, right shapes, weights only where visible
        a, b = train(s, np.random.default_rng(100 + i)), train(s, np.random.default_rng(100 + i))
        np.testing.assert_array_equal(a["img"], b["img"])
        np.testing.assert_array_equal(a["heatmaps"], b["heatmaps"])
        assert a["heatmaps"].shape == (17, 64, 48)
        assert set(np.flatnonzero(a["keypoint_weights"])) <= set(np.flatnonzero(a["keypoints_visible"]))
