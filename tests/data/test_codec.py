"""UDP heatmap codec: hand-computed targets, encode/decode round trip, a loop reference for DARK-UDP, flip, loss."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from bmp_lightning.data.codec import (
    UDPHeatmap,
    flip_heatmaps,
    gaussian_kernel_1d,
    keypoint_mse_loss,
    keypoints_to_image,
)
from bmp_lightning.structures.keypoints import COCO_FLIP_INDICES, FLIP_INDICES

SF = np.array([191 / 47, 255 / 63])  # input pixels per heatmap pixel


def test_gaussian_kernel_matches_opencv():
    np.testing.assert_allclose(gaussian_kernel_1d(11), cv2.getGaussianKernel(11, 0)[:, 0], atol=1e-12)


def test_encode_hand_computed():
    codec = UDPHeatmap()
    kp_hm = np.array([[10.3, 20.6]])  # heatmap coordinates
    hm, w = codec.encode(kp_hm * SF, np.array([1.0]))
    assert hm.shape == (1, 64, 48) and hm.dtype == np.float32 and w.tolist() == [1.0]
    # value at (x=11, y=19): exp(-((11-10.3)^2 + (19-20.6)^2) / (2*2^2))
    assert hm[0, 19, 11] == pytest.approx(np.exp(-(0.7**2 + 1.6**2) / 8), abs=1e-6)
    # window = 13x13 around round(kp) = (10, 21): x 4..16, y 15..27
    ys, xs = np.nonzero(hm[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 16, 15, 27)
    assert hm[0].max() == pytest.approx(np.exp(-(0.3**2 + 0.4**2) / 8), abs=1e-6)


def test_encode_weights():
    codec = UDPHeatmap()
    kps = np.array(
        [
            [50.0, 50.0],  # visible
            [50.0, 50.0],  # invisible
            [-30.0, 50.0],  # kp_hm x = -7.38 -> mu = trunc(-6.88) = -6: the window still reaches column 0
            [-60.0, 50.0],  # kp_hm x = -14.8: fully outside
            [191.0 + 60.0, 100.0],  # fully right
            [100.0, 255.0 + 10.0],  # just below the map: window partly inside
        ]
    )
    vis = np.array([2.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    hm, w = codec.encode(kps, vis)
    assert w.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert hm[1].max() == 0 and hm[3].max() == 0 and hm[4].max() == 0
    assert hm[2].max() > 0 and hm[5].max() > 0
    assert hm[0].max() == pytest.approx(np.exp(-(((50 / SF - np.trunc(50 / SF + 0.5)) ** 2).sum()) / 8), abs=1e-6)


def test_encode_decode_round_trip_subpixel():
    codec = UDPHeatmap()
    rng = np.random.default_rng(0)
    kps = rng.uniform([30, 30], [160, 225], size=(6, 21, 2))  # away from the border
    maps = np.stack([codec.encode(k, np.ones(21))[0] for k in kps])
    dec, scores = codec.decode(torch.from_numpy(maps))
    assert dec.shape == (6, 21, 2) and scores.shape == (6, 21)
    assert np.abs(dec.numpy() - kps).max() < 0.05
    # the peak pixel is at most half a pixel off in x and y: exp(-(0.5^2 + 0.5^2) / 8)
    assert (scores.numpy() >= np.exp(-0.5 / 8) - 1e-6).all()


def _dark_udp_loop_reference(hm: np.ndarray) -> np.ndarray:
    """Per-keypoint numpy/cv2 transcription of MMPose's ``refine_keypoints_dark_udp`` (zero-pad + blur, Newton step)."""
    k_, h, w = hm.shape
    out = np.zeros((k_, 2))
    for k in range(k_):
        y, x = np.unravel_index(hm[k].argmax(), hm[k].shape)
        big = np.zeros((h + 10, w + 10), np.float32)
        big[5:-5, 5:-5] = hm[k]
        blur = cv2.GaussianBlur(big, (11, 11), 0)[5:-5, 5:-5]
        blur *= hm[k].max() / blur.max()
        L = np.pad(np.log(np.clip(blur, 1e-3, 50)), 1, mode="edge")
        py, px = y + 1, x + 1
        dx = 0.5 * (L[py, px + 1] - L[py, px - 1])
        dy = 0.5 * (L[py + 1, px] - L[py - 1, px])
        dxx = L[py, px + 1] - 2 * L[py, px] + L[py, px - 1]
        dyy = L[py + 1, px] - 2 * L[py, px] + L[py - 1, px]
        dxy = 0.5 * (
            L[py + 1, px + 1] - L[py, px + 1] - L[py + 1, px] + 2 * L[py, px] - L[py, px - 1] - L[py - 1, px]
            + L[py - 1, px - 1]
        )  # fmt: skip
        hess = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
        out[k] = np.array([x, y], float) - np.linalg.inv(hess) @ np.array([dx, dy])
    return out * SF


def test_decode_matches_loop_reference_on_noisy_maps():
    codec = UDPHeatmap()
    rng = np.random.default_rng(1)
    kps = rng.uniform([0, 0], [191, 255], size=(3, 21, 2))  # incl. near-border peaks
    maps = np.stack([codec.encode(k, np.ones(21))[0] for k in kps])
    maps = (maps + rng.uniform(0, 0.1, maps.shape)).astype(np.float32)
    dec, scores = codec.decode(torch.from_numpy(maps))
    ref = np.stack([_dark_udp_loop_reference(m) for m in maps])
    np.testing.assert_allclose(dec.numpy(), ref, atol=2e-3)
    np.testing.assert_allclose(scores.numpy(), maps.reshape(3, 21, -1).max(-1))


def test_decode_empty_channel():
    codec = UDPHeatmap()
    maps = torch.zeros(2, 17, 64, 48)
    maps[0, 3, 10, 20] = 0.5
    dec, scores = codec.decode(maps)
    assert scores[1].eq(0).all() and scores[0, 3] == 0.5
    np.testing.assert_allclose(dec[1].numpy(), np.broadcast_to(-SF, (17, 2)), rtol=1e-6)
    # an isolated peak stays where it is (symmetric neighbourhood -> zero gradient)
    np.testing.assert_allclose(dec[0, 3].numpy(), np.array([20, 10]) * SF, atol=1e-4)
    with pytest.raises(ValueError, match="codec expects"):
        codec.decode(torch.zeros(1, 17, 48, 64))


@pytest.mark.parametrize("flip_indices", [FLIP_INDICES, COCO_FLIP_INDICES])
def test_flip_heatmaps(flip_indices):
    codec = UDPHeatmap()
    k = len(flip_indices)
    rng = np.random.default_rng(2)
    kps = rng.uniform([5, 5], [186, 250], size=(k, 2))
    vis = (rng.random(k) > 0.2).astype(np.float32)
    hm, _ = codec.encode(kps, vis)
    # double flip is the identity (numpy and torch)
    np.testing.assert_array_equal(flip_heatmaps(flip_heatmaps(hm, flip_indices), flip_indices), hm)
    t = torch.from_numpy(hm)[None]
    assert torch.equal(flip_heatmaps(flip_heatmaps(t, flip_indices), flip_indices), t)
    # mirroring the crop (x -> 191 - x, left <-> right) mirrors the heatmaps with no 1-px shift
    mirrored = np.stack([191 - kps[:, 0], kps[:, 1]], 1)[list(flip_indices)]
    hm_m, _ = codec.encode(mirrored, vis[list(flip_indices)])
    np.testing.assert_allclose(flip_heatmaps(hm, flip_indices), hm_m, atol=1e-5)
    np.testing.assert_allclose(flip_heatmaps(t, flip_indices)[0].numpy(), hm_m, atol=1e-5)


def test_keypoints_to_image_hand_computed():
    center = np.array([[100.0, 200.0]])
    scale = np.array([[382.0, 510.0]])  # 2 image pixels per crop pixel
    kp = np.array([[[0.0, 0.0], [191.0, 255.0], [95.5, 127.5], [10.0, 20.0]]])
    expect = np.array([[[-91.0, -55.0], [291.0, 455.0], [100.0, 200.0], [-71.0, -15.0]]])
    np.testing.assert_allclose(keypoints_to_image(kp, center, scale), expect)
    out = keypoints_to_image(torch.tensor(kp), torch.tensor(center), torch.tensor(scale))
    np.testing.assert_allclose(out.numpy(), expect)


def test_keypoint_mse_loss_hand_computed():
    pred = torch.zeros(2, 3, 4, 5)
    target = torch.zeros(2, 3, 4, 5)
    target[0, 0] = 1.0  # 20 pixels of squared error 1
    target[1, 2, 0, 0] = 2.0  # 1 pixel of squared error 4
    w = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 3.0]])
    expected = (20 * 1 * 0.5 + 4 * 3.0) / (2 * 3 * 4 * 5)
    assert keypoint_mse_loss(pred, target, w).item() == pytest.approx(expected)
    assert keypoint_mse_loss(pred, target).item() == pytest.approx((20 + 4) / 120)
