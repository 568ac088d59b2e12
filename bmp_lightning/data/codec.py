"""UDP Gaussian heatmap codec (encode for training targets, batched DARK-UDP decode in torch).

Facts carried over from MMPose 1.x ``UDPHeatmap(input_size=(192, 256), heatmap_size=(48, 64), sigma=2)``
(MMPose ``mmpose/codecs/udp_heatmap.py``; docs/recipes.md#vitpose-b):

* heatmap coordinate = input coordinate * (hm_size - 1) / (input_size - 1) (the UDP convention: pixel 0 and pixel
  size-1 of both grids coincide);
* an unnormalised Gaussian (peak <= 1) centred at the sub-pixel position, truncated to a 13x13 window around the
  rounded position (radius 3 sigma);
* decode = argmax, then one Newton step on the log of the blurred heatmap (DARK with UDP), score = the raw maximum.

One deliberate difference in bookkeeping (final image coordinates are identical to MMPose): MMPose's decoder
returns ``kp_hm / (hm_size - 1) * input_size`` and undoes it with ``/ input_size * bbox_scale``; here ``decode``
returns true crop pixels ``kp_hm * (input_size - 1) / (hm_size - 1)`` (the frame ``TopdownAffine`` maps keypoints
into) and :func:`keypoints_to_image` divides by ``input_size - 1``. Both compose to
``kp_hm / (hm_size - 1) * bbox_scale + center - bbox_scale / 2``, the exact inverse of the UDP warp.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "UDPHeatmap",
    "flip_heatmaps",
    "flip_test_heatmaps",
    "keypoints_to_image",
    "keypoint_mse_loss",
    "gaussian_kernel_1d",
    "bench_decoder",
]


def gaussian_kernel_1d(ksize: int, sigma: float = 0.0) -> np.ndarray:
    """The 1-D kernel ``cv2.getGaussianKernel(ksize, sigma)`` builds for ksize > 7 (``(ksize,)`` float64, sums to 1).

    With ``sigma <= 0`` OpenCV picks ``0.3 * ((ksize - 1) / 2 - 1) + 0.8`` (2.0 for ksize 11).
    """
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _band_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
    """``(n, n)`` matrix M with ``M @ v`` = correlation of v with ``kernel`` under zero padding."""
    r = len(kernel) // 2
    m = np.zeros((n, n), np.float64)
    for off in range(-r, r + 1):
        m += np.eye(n, k=off) * kernel[off + r]
    return m


class UDPHeatmap:
    """UDP Gaussian heatmaps.

    Args:
        input_size: model input ``(w, h)``.
        heatmap_size: heatmap ``(w, h)``.
        sigma: Gaussian sigma in heatmap pixels (the window radius is ``3 * sigma``).
        blur_kernel_size: kernel of the Gaussian blur used by the DARK-UDP refinement.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (192, 256),
        heatmap_size: Sequence[int] = (48, 64),
        sigma: float = 2.0,
        blur_kernel_size: int = 11,
    ) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.heatmap_size = (int(heatmap_size[0]), int(heatmap_size[1]))
        self.sigma = float(sigma)
        self.blur_kernel_size = int(blur_kernel_size)
        # input pixels per heatmap pixel, (w, h): (191/47, 255/63) for the defaults
        self.scale_factor = (np.array(self.input_size, np.float64) - 1) / (np.array(self.heatmap_size) - 1)
        kernel = gaussian_kernel_1d(self.blur_kernel_size)
        w, h = self.heatmap_size
        self._xs = np.arange(w, dtype=np.float64)[None]
        self._ys = np.arange(h, dtype=np.float64)[None]
        # The zero-padded separable blur as two small dense matrices: blurred = Bh @ hm @ Bw^T. A matmul beats a
        # depthwise conv on CPU for 64x48 maps and keeps the zero-padding semantics exact.
        self._blur_h = torch.from_numpy(_band_matrix(h, kernel)).float()
        self._blur_w_t = torch.from_numpy(_band_matrix(w, kernel).T.copy()).float()

    # ------------------------------------------------------------------ encode
    def encode(self, keypoints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints in input (crop) pixels -> targets.

        Args:
            keypoints: ``(K, 2)`` x, y in the ``input_size`` frame.
            visible: ``(K,)`` visibility (COCO 0/1/2 or 0/1 floats); below 0.5 means "no target".

        Returns:
            heatmaps ``(K, H, W)`` float32 and keypoint weights ``(K,)`` float32 (``min(1, v)``, 0 for invisible
            keypoints and for those whose 13x13 window lies entirely outside the heatmap).
        """
        keypoints = np.asarray(keypoints, np.float64).reshape(-1, 2)
        visible = np.asarray(visible, np.float64).reshape(-1)
        if len(visible) != len(keypoints):
            raise ValueError(f"keypoints {keypoints.shape} and visible {visible.shape} disagree")
        w, h = self.heatmap_size
        radius = 3 * self.sigma
        kp = keypoints / self.scale_factor  # (K, 2) heatmap coordinates
        valid = (visible >= 0.5) & np.isfinite(kp).all(1)
        kp = np.where(valid[:, None], kp, 0.0)
        mu = np.trunc(kp + 0.5)  # MMPose: (kp + 0.5).astype(int), i.e. truncation toward 0
        left, top = mu[:, 0] - radius, mu[:, 1] - radius
        right, bottom = mu[:, 0] + radius + 1, mu[:, 1] + radius + 1
        # MMPose tests `right < 0`; `<= 0` is the same "window fully outside" test without its off-by-one.
        outside = (left >= w) | (top >= h) | (right <= 0) | (bottom <= 0)
        weights = np.where(valid & ~outside, np.minimum(visible, 1.0), 0.0)

        # separable: one (K, W) and one (K, H) Gaussian profile (float64), their outer product in float32 (within an
        # ulp of the float64 product; no per-keypoint loop, 3x less work than a float64 (K, H, W) product)
        inv = -1.0 / (2 * self.sigma**2)
        gx = np.exp((self._xs - kp[:, :1]) ** 2 * inv) * (np.abs(self._xs - mu[:, :1]) <= radius)
        gy = np.exp((self._ys - kp[:, 1:]) ** 2 * inv) * (
            (np.abs(self._ys - mu[:, 1:]) <= radius) & (weights > 0)[:, None]
        )
        heatmaps = gy.astype(np.float32)[:, :, None] * gx.astype(np.float32)[:, None, :]
        return heatmaps, weights.astype(np.float32)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched argmax + DARK-UDP refinement.

        Args:
            heatmaps: ``(B, K, H, W)`` (already flip-averaged if flip test is used).

        Returns:
            keypoints ``(B, K, 2)`` float32 in input (crop) pixels and scores ``(B, K)`` (the raw heatmap maxima).
            Channels whose maximum is <= 0 get heatmap location -1 (as MMPose) and no refinement.
        """
        if heatmaps.ndim != 4:
            raise ValueError(f"expected (B, K, H, W) heatmaps, got {tuple(heatmaps.shape)}")
        b, k, h, w = heatmaps.shape
        if (w, h) != self.heatmap_size:
            raise ValueError(f"heatmaps are {w}x{h}, the codec expects {self.heatmap_size[0]}x{self.heatmap_size[1]}")
        hm = heatmaps.detach().float()
        scores, idx = hm.reshape(b, k, -1).max(dim=-1)
        x = idx % w
        y = torch.div(idx, w, rounding_mode="floor")
        valid = scores > 0

        # a. blur with zero padding, then give every map back its original maximum
        blur_h = self._blur_h.to(hm.device)
        blur_w_t = self._blur_w_t.to(hm.device)
        blurred = torch.matmul(torch.matmul(blur_h, hm), blur_w_t)
        bmax = blurred.amax(dim=(-2, -1))
        ratio = torch.where(bmax > 0, scores / bmax.clamp_min(1e-30), torch.zeros_like(bmax))
        # b. log domain (a Gaussian becomes a quadratic). Only the 3x3 stencil around each argmax is needed, so
        # gather it first and take clip + log on 9 values per keypoint; clamping the indices is the edge padding.
        flat = blurred.reshape(b, k, h * w)

        def at(dy: int, dx: int) -> torch.Tensor:
            yy = (y + dy).clamp(0, h - 1)
            xx = (x + dx).clamp(0, w - 1)
            v = torch.gather(flat, 2, (yy * w + xx).unsqueeze(-1)).squeeze(-1)
            return (v * ratio).clamp(1e-3, 50.0).log()

        i0 = at(0, 0)
        ix1, ix1_ = at(0, 1), at(0, -1)
        iy1, iy1_ = at(1, 0), at(-1, 0)
        ix1y1, ix1_y1_ = at(1, 1), at(-1, -1)
        # c. central differences at the argmax
        dx = 0.5 * (ix1 - ix1_)
        dy = 0.5 * (iy1 - iy1_)
        dxx = ix1 - 2 * i0 + ix1_
        dyy = iy1 - 2 * i0 + iy1_
        dxy = 0.5 * (ix1y1 - ix1 - iy1 + 2 * i0 - ix1_ - iy1_ + ix1_y1_)
        # d. Newton step kp -= inv(H + eps I) @ grad, closed-form 2x2 inverse
        eps = float(np.finfo(np.float32).eps)
        a, c = dxx + eps, dyy + eps
        det = a * c - dxy * dxy
        # a singular Hessian (flat, fully clipped log map) gets no step rather than MMPose's grad / eps jump
        ok = valid & (det.abs() > 1e-12)
        safe_det = torch.where(ok, det, torch.ones_like(det))
        step_x = (c * dx - dxy * dy) / safe_det
        step_y = (a * dy - dxy * dx) / safe_det
        zero = torch.zeros_like(step_x)
        kx = x.float() - torch.where(ok, step_x, zero)
        ky = y.float() - torch.where(ok, step_y, zero)
        kp_hm = torch.stack([kx, ky], dim=-1)
        kp_hm = torch.where(valid[..., None], kp_hm, torch.full_like(kp_hm, -1.0))
        sf = torch.as_tensor(self.scale_factor, dtype=torch.float32, device=hm.device)
        return kp_hm * sf, scores

    def decode_to_image(
        self, heatmaps: torch.Tensor, center: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` (in float32) followed by :func:`keypoints_to_image` (image pixels ``(B, K, 2)``, scores
        ``(B, K)``): the one decode of validation and ``PoseEstimator``."""
        kpts, scores = self.decode(heatmaps.float())
        return keypoints_to_image(kpts, center.to(kpts), scale.to(kpts), self.input_size), scores


def flip_test_heatmaps(
    net: Callable[[torch.Tensor], torch.Tensor],
    img: torch.Tensor,
    flip_indices: Sequence[int] | Callable[[int], Sequence[int]],
    flip_test: bool = True,
) -> torch.Tensor:
    """Heatmaps of normalised crops, averaged with the flipped crop's heatmaps (mirrored and channel-swapped, no
    shift under UDP) when ``flip_test``: the one flip test of validation (``PoseLitModule``) and ``PoseEstimator``.
    ``flip_indices``: the permutation (cut to the network's heatmap count: a 17-keypoint head takes the COCO slots),
    or a function of the heatmap count (``structures.keypoints.flip_indices_for``, the registered schemas)."""
    if not flip_test:
        return net(img)
    hm, hm_flip = net(torch.cat([img, img.flip(-1)], 0)).chunk(2, 0)
    idx = flip_indices(hm.shape[1]) if callable(flip_indices) else list(flip_indices)[: hm.shape[1]]
    return 0.5 * (hm + flip_heatmaps(hm_flip, idx))


def flip_heatmaps(heatmaps: torch.Tensor | np.ndarray, flip_indices: Sequence[int]) -> torch.Tensor | np.ndarray:
    """Mirror ``(..., K, H, W)`` heatmaps along W and swap left/right channels (no 1-px shift under UDP)."""
    idx = list(flip_indices)
    if heatmaps.shape[-3] != len(idx):
        raise ValueError(f"{heatmaps.shape[-3]} heatmap channels but {len(idx)} flip indices")
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps.flip(-1)[..., idx, :, :]
    return np.ascontiguousarray(heatmaps[..., ::-1][..., idx, :, :])


def keypoints_to_image(
    keypoints: torch.Tensor | np.ndarray,
    center: torch.Tensor | np.ndarray,
    scale: torch.Tensor | np.ndarray,
    input_size: Sequence[int] = (192, 256),
) -> torch.Tensor | np.ndarray:
    """Crop pixels ``(B, K, 2)`` -> image pixels, the exact inverse of the UDP warp with rotation 0.

    ``center`` and ``scale`` are ``(B, 2)``: the final (aspect-fixed) ``bbox_center`` / ``bbox_scale`` that
    ``TopdownAffine`` used. x_img = x_in * scale / (size - 1) + center - scale / 2.
    """
    if isinstance(keypoints, torch.Tensor):
        size = keypoints.new_tensor([input_size[0] - 1, input_size[1] - 1])
        center = torch.as_tensor(center, dtype=keypoints.dtype, device=keypoints.device)
        scale = torch.as_tensor(scale, dtype=keypoints.dtype, device=keypoints.device)
    else:
        size = np.array([input_size[0] - 1, input_size[1] - 1], np.float64)
        center, scale = np.asarray(center, np.float64), np.asarray(scale, np.float64)
    return keypoints * (scale / size)[..., None, :] + (center - 0.5 * scale)[..., None, :]


def keypoint_mse_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MMPose ``KeypointMSELoss(use_target_weight=True)``: mean over B*K*H*W of ``(pred - target)^2 * w[b, k]``.

    Args:
        pred, target: ``(B, K, H, W)``.
        weights: ``(B, K)`` keypoint weights, or None for an unweighted mean.
    """
    err = (pred - target) ** 2
    if weights is not None:
        err = err * weights[..., None, None].to(err.dtype)
    return err.mean()


def bench_decoder(n: int = 1024, num_keypoints: int = 21, repeats: int = 3, device: str = "cpu") -> float:
    """Decoder throughput in instances/s on ``n`` random-peak heatmaps (best of ``repeats``)."""
    codec = UDPHeatmap()
    rng = np.random.default_rng(0)
    kpts = rng.uniform([8, 8], [183, 247], size=(n, num_keypoints, 2))
    maps = np.stack([codec.encode(k, np.ones(num_keypoints))[0] for k in kpts])
    hm = torch.from_numpy(maps).to(device)
    codec.decode(hm)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        codec.decode(hm)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best
