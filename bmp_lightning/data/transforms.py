"""Top-down pose transforms: one person -> a 192x256 crop (+ UDP heatmap targets when training).

A sample is a plain dict. Input keys:

* ``img`` ``(H, W, 3)`` uint8 RGB; ``bbox`` ``(4,)`` xyxy; ``keypoints`` ``(K, 2)``; ``keypoints_visible`` ``(K,)``
  0/1; ``mask`` ``(H, W)`` uint8 0/1 or None;
* optional ``flip_indices``, ``upper_body_ids``, ``lower_body_ids`` (defaults from
  :mod:`bmp_lightning.structures.keypoints` for K = 21 or 17) and ``where`` (file/entry text used in error messages).

Every transform is ``__call__(sample, rng) -> sample`` and draws all its randomness from ``rng``, so a pipeline is
deterministic given the generator. Transforms replace arrays instead of writing into them, so the caller's arrays
are never modified.

Order and constants follow BBoxMaskPose (docs/recipes.md#vitpose-b, docs/recipes.md#maskpose-b), including
its crop bookkeeping: ``bbox`` is the *unpadded* working box (the fork's ``bbox_xyxy_wrt_input``). Flip, half-body
and bbox jitter edit that box (the half-body box is clipped to it; shift/scale act on the unpadded size) and
``TopdownAffine`` recomputes center/scale from it with padding 1.25, then fixes the aspect ratio to 192:256 by
enlarging the short side. ``bbox_center``/``bbox_scale`` always describe the padded box; after ``TopdownAffine``
they are the final aspect-fixed values that decoding needs.

The crop geometry (box conversions, UDP warp matrix, ``TopdownAffine``) lives in :mod:`bmp_lightning.data.crop`;
its public names are re-exported here, so ``bmp_lightning.data.transforms.<name>`` keeps working for every step.
How the steps are run (the full-image reference ``Compose``, the region-first ``RoiCompose``, one random stream
per step) and assembled (``build_pose_pipeline``) is :mod:`bmp_lightning.data.pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from bmp_lightning.data.codec import UDPHeatmap
from bmp_lightning.data.crop import (
    Sample,
    TopdownAffine,
    _where,
    affine_points,
    bbox_cs_to_xyxy,
    bbox_xyxy_to_cs,
    fix_aspect_ratio,
    get_udp_warp_matrix,
)
from bmp_lightning.data.mask_perturb import perturb_mask, perturb_mask_region
from bmp_lightning.structures.keypoints import schema_for
from bmp_lightning.structures.records import BadSampleError

__all__ = [
    "GetBBoxCenterScale",
    "MaskBackground",
    "RandomFlip",
    "RandomHalfBody",
    "RandomBBoxTransform",
    "TopdownAffine",
    "PhotometricAug",
    "GenerateTarget",
    "bbox_xyxy_to_cs",
    "bbox_cs_to_xyxy",
    "fix_aspect_ratio",
    "get_udp_warp_matrix",
    "affine_points",
    "truncated_normal",
]


# ---------------------------------------------------------------------------------------------------- helpers
def truncated_normal(rng: np.random.Generator, size: int | tuple[int, ...], low: float = -1.0, high: float = 1.0):
    """Standard normal draws restricted to ``[low, high]`` (rejection sampling; float64 array of ``size``)."""
    size = (size,) if isinstance(size, int) else tuple(size)
    out = rng.standard_normal(size)
    bad = (out < low) | (out > high)
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = (out < low) | (out > high)
    return out


def _schema(sample: Sample) -> tuple[list[int], list[int], list[int]]:
    """flip indices, upper ids, lower ids of the sample (its own keys, else the schema defaults)."""
    k = len(sample["keypoints"])
    schema = schema_for(k)  # the registered schema of this count (21, or its COCO part 17)
    if schema is not None:
        flip = schema.flip_indices(k)
        upper = tuple(i for i in schema.upper_body if i < k)
        lower = tuple(i for i in schema.lower_body if i < k)
    else:
        flip = upper = lower = None
    flip = sample.get("flip_indices", flip)
    upper = sample.get("upper_body_ids", upper)
    lower = sample.get("lower_body_ids", lower)
    if flip is None or upper is None or lower is None:
        raise ValueError(f"{_where(sample)}: {k} keypoints need flip_indices, upper_body_ids and lower_body_ids")
    return list(flip), list(upper), list(lower)


def _set_box(sample: Sample, bbox: np.ndarray, padding: float) -> None:
    sample["bbox"] = np.asarray(bbox, np.float64)
    sample["bbox_center"], sample["bbox_scale"] = bbox_xyxy_to_cs(bbox, padding)


# ---------------------------------------------------------------------------------------------------- transforms
class GetBBoxCenterScale:
    """``bbox`` -> ``bbox_center``, ``bbox_scale`` (= size * padding) and ``bbox_rotation`` 0; validates the box."""

    draws_random = False  # its stream is never built (see TransformStreams.of)

    def __init__(self, padding: float = 1.25) -> None:
        self.padding = padding

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        bbox = np.asarray(sample["bbox"], np.float64).reshape(-1)
        if bbox.shape != (4,) or not np.isfinite(bbox).all() or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise BadSampleError(f"{_where(sample)}: invalid xyxy bbox {bbox.tolist()}")
        _set_box(sample, bbox, self.padding)
        sample["bbox_rotation"] = 0.0
        sample["padding"] = self.padding
        return sample

    def __repr__(self) -> str:
        return f"GetBBoxCenterScale(padding={self.padding})"


class MaskBackground:
    """MaskPose's only use of the mask: dim the background of the full image.

    ``img = round((1 - alpha) * img + alpha * img * mask)`` (``cv2.addWeighted``): foreground pixels are unchanged,
    background pixels become ``round(0.8 * x)`` for alpha 0.2. With ``perturb`` the mask is first degraded by
    :func:`~bmp_lightning.data.mask_perturb.perturb_mask`; the mask actually used replaces ``sample['mask']``.

    Args:
        alpha: weight of the masked image.
        perturb: degrade the mask first (train only).
        prob: probability of masking at all (BMP trains with 1.0).
        erode_prob, erode_amount, dilate_prob, dilate_amount: perturbation parameters (see ``mask_perturb``).
        continue_on_failure: pass samples without a mask through unchanged instead of raising ``BadSampleError``.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        perturb: bool = False,
        prob: float = 1.0,
        erode_prob: float = 0.5,
        erode_amount: float = 0.5,
        dilate_prob: float = 0.5,
        dilate_amount: float = 0.1,
        continue_on_failure: bool = False,
    ) -> None:
        if not 0 <= alpha <= 1 or not 0 <= prob <= 1:
            raise ValueError(f"alpha and prob must lie in [0, 1], got {alpha}, {prob}")
        self.alpha = alpha
        self.perturb = perturb
        self.prob = prob
        self.erode_prob = erode_prob
        self.erode_amount = erode_amount
        self.dilate_prob = dilate_prob
        self.dilate_amount = dilate_amount
        self.continue_on_failure = continue_on_failure

    def _checked_mask(self, sample: Sample) -> np.ndarray | None:
        mask = sample.get("mask")
        if mask is None:
            if self.continue_on_failure:
                return None
            raise BadSampleError(f"{_where(sample)}: MaskBackground needs an instance mask but the sample has none")
        shape = sample["img"].shape[:2]
        if mask.shape[:2] != shape:
            raise BadSampleError(f"{_where(sample)}: mask {mask.shape[:2]} does not match image {shape}")
        return mask

    @property
    def draws_random(self) -> bool:
        """Whether this transform uses its random stream (not in validation: always masked, no perturbation)."""
        return self.perturb or self.prob < 1.0

    def _skipped(self, rng: np.random.Generator | None) -> bool:
        return self.prob < 1.0 and rng.random() >= self.prob  # prob 1 (BMP's setting): no draw

    def _perturb_kwargs(self) -> dict[str, float]:
        return {
            "erode_prob": self.erode_prob,
            "erode_amount": self.erode_amount,
            "dilate_prob": self.dilate_prob,
            "dilate_amount": self.dilate_amount,
        }

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        mask = self._checked_mask(sample)
        if mask is None or self._skipped(rng):
            return sample
        img = sample["img"]
        mask = (np.asarray(mask) > 0).astype(np.uint8)
        if self.perturb:
            mask = perturb_mask(mask, rng, **self._perturb_kwargs())
        masked = img * mask[..., None]
        sample["img"] = cv2.addWeighted(img, 1.0 - self.alpha, masked, self.alpha, 0.0)
        sample["mask"] = mask
        return sample

    def apply_region(
        self,
        sample: Sample,
        rng: np.random.Generator,
        box: tuple[int, int, int, int],
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(img, mask)`` of ``box = (x0, y0, x1, y1)`` after this transform: the same pixels as ``__call__``'s
        full-image result cropped to the box (same draws), computed on the box only (dimmed pixels written into
        ``out``, a box-shaped array, when given)."""
        x0, y0, x1, y1 = box
        img = sample["img"][y0:y1, x0:x1]
        mask = self._checked_mask(sample)
        if mask is None:
            return img, None
        if self._skipped(rng):
            return img, mask[y0:y1, x0:x1]
        if self.perturb:
            region = perturb_mask_region(mask, box, rng, **self._perturb_kwargs())
        else:
            region = (np.asarray(mask[y0:y1, x0:x1]) > 0).astype(np.uint8)
        return self.dim_background(img, region, out), region

    def dim_background(self, img: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``cv2.addWeighted(img, 1 - alpha, img * mask, alpha, 0)`` for a 0/1 ``mask``, bit for bit, without the
        full-size products: background pixels through ``cv2.convertScaleAbs(img, 1 - alpha)`` (SIMD; 4x faster than
        a table look-up) where that equals ``addWeighted`` on all 256 values (checked once per alpha), else through
        the table of ``addWeighted``'s 256 results; foreground pixels copied (or through their own table when
        ``addWeighted`` is not the identity on them)."""
        if img.dtype != np.uint8:
            return cv2.addWeighted(img, 1.0 - self.alpha, img * mask[..., None], self.alpha, 0.0)
        if getattr(self, "_luts", (None,))[0] != self.alpha:
            x = np.arange(256, dtype=np.uint8)[None]
            lut_bg = cv2.addWeighted(x, 1.0 - self.alpha, np.zeros_like(x), self.alpha, 0.0)[0]
            lut_fg = cv2.addWeighted(x, 1.0 - self.alpha, x, self.alpha, 0.0)[0]
            scale_ok = np.array_equal(cv2.convertScaleAbs(x, alpha=1.0 - self.alpha)[0], lut_bg)
            self._luts = (self.alpha, lut_bg, None if np.array_equal(lut_fg, x[0]) else lut_fg, scale_ok)
        _, lut_bg, lut_fg, scale_ok = self._luts
        fg = img if lut_fg is None else cv2.LUT(img, lut_fg)
        if out is not None and np.may_share_memory(out, img):
            out = None  # in place over its own input: the foreground would be read after being dimmed
        if scale_ok:
            bg = cv2.convertScaleAbs(img, dst=out, alpha=1.0 - self.alpha)
        else:
            bg = cv2.LUT(img, lut_bg, dst=out)
        return cv2.copyTo(fg, mask, bg)

    def __repr__(self) -> str:
        return f"MaskBackground(alpha={self.alpha}, perturb={self.perturb}, prob={self.prob})"


class RandomFlip:
    """Horizontal flip of the full image: x' = W - 1 - x for image, mask, box, center and keypoints; left/right
    keypoints (and their visibilities) are swapped by ``flip_indices``. Sets ``flip``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def flip_geometry(self, sample: Sample, rng: np.random.Generator, width: int) -> bool:
        """Draw the flip and mirror the box, center and keypoints for an image ``width`` wide (not the pixels)."""
        flip = bool(rng.random() < self.prob)
        sample["flip"] = flip
        if not flip:
            return False
        flip_indices, _, _ = _schema(sample)
        w = width
        x1, y1, x2, y2 = np.asarray(sample["bbox"], np.float64)
        sample["bbox"] = np.array([w - 1 - x2, y1, w - 1 - x1, y2])
        if "bbox_center" in sample:
            c = np.asarray(sample["bbox_center"], np.float64)
            sample["bbox_center"] = np.array([w - 1 - c[0], c[1]])
        kpts = np.asarray(sample["keypoints"], np.float64)[:, :2]
        kpts = np.stack([w - 1 - kpts[:, 0], kpts[:, 1]], axis=1)
        sample["keypoints"] = kpts[flip_indices]
        sample["keypoints_visible"] = np.asarray(sample["keypoints_visible"])[flip_indices]
        return True

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = sample["img"]
        if not self.flip_geometry(sample, rng, img.shape[1]):
            return sample
        sample["img"] = np.ascontiguousarray(img[:, ::-1])
        if sample.get("mask") is not None:
            sample["mask"] = np.ascontiguousarray(sample["mask"][:, ::-1])
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class RandomHalfBody:
    """Crop the upper or the lower body only (BBoxMaskPose/ProbPose variant).

    Applies (with ``prob``) to people with >= ``min_total_keypoints`` visible keypoints. The half is the upper one
    with probability ``upper_prioritized_prob`` unless a half lacks keypoints (< ``min_upper_keypoints`` /
    ``min_lower_keypoints``). New box: the visible half's keypoint extent * ``padding`` around their mean,
    **clipped to the current box**.
    """

    def __init__(
        self,
        min_total_keypoints: int = 9,
        min_upper_keypoints: int = 2,
        min_lower_keypoints: int = 3,
        padding: float = 1.5,
        prob: float = 0.3,
        upper_prioritized_prob: float = 0.7,
    ) -> None:
        self.min_total_keypoints = min_total_keypoints
        self.min_upper_keypoints = min_upper_keypoints
        self.min_lower_keypoints = min_lower_keypoints
        self.padding = padding
        self.prob = prob
        self.upper_prioritized_prob = upper_prioritized_prob

    def select(self, visible: np.ndarray, upper: Sequence[int], lower: Sequence[int], rng: np.random.Generator):
        """The keypoint ids of the chosen half, or None (no half-body crop). Same draw order as MMPose."""
        visible = np.asarray(visible).reshape(-1)
        if (visible > 0).sum() < self.min_total_keypoints or rng.random() > self.prob:
            return None
        upper, lower = np.asarray(upper, np.int64), np.asarray(lower, np.int64)
        up, lo = upper[visible[upper] > 0], lower[visible[lower] > 0]  # the visible ids of each half, in order
        prefer_upper = rng.random() < self.upper_prioritized_prob
        if len(up) < self.min_upper_keypoints and len(lo) < self.min_lower_keypoints:
            return None
        if len(lo) < self.min_lower_keypoints:
            return up
        if len(up) < self.min_upper_keypoints:
            return lo
        return up if prefer_upper else lo

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        _, upper, lower = _schema(sample)
        ids = self.select(sample["keypoints_visible"], upper, lower, rng)
        sample["half_body"] = False
        if ids is None:
            return sample
        pts = np.asarray(sample["keypoints"], np.float64)[ids, :2]
        center = pts.mean(axis=0)
        size = (pts.max(axis=0) - pts.min(axis=0)) * self.padding
        box = bbox_cs_to_xyxy(center, size)
        orig = np.asarray(sample["bbox"], np.float64)
        box = np.concatenate([np.maximum(box[:2], orig[:2]), np.minimum(box[2:], orig[2:])])
        wh = box[2:] - box[:2]
        # keypoints outside their own box can leave nothing after the clip: keep the full box then
        if (wh < 0).any() or (wh <= 0).all():
            return sample
        _set_box(sample, box, sample.get("padding", 1.25))
        sample["half_body"] = True
        return sample

    def __repr__(self) -> str:
        return f"RandomHalfBody(min_total_keypoints={self.min_total_keypoints}, prob={self.prob})"


class RandomBBoxTransform:
    """Jitter the box: shift by ``t * shift_factor * size``, scale by ``mid + half_range * t``, rotate by
    ``t * rotate_factor`` degrees, each with its own probability; all ``t`` are truncated normals on [-1, 1].

    As in the fork, shift and scale act on the unpadded working box; the rotation goes to ``bbox_rotation``.
    """

    def __init__(
        self,
        shift_factor: float = 0.16,
        shift_prob: float = 0.3,
        scale_factor: tuple[float, float] = (0.5, 1.5),
        scale_prob: float = 1.0,
        rotate_factor: float = 80.0,
        rotate_prob: float = 0.6,
    ) -> None:
        self.shift_factor = shift_factor
        self.shift_prob = shift_prob
        self.scale_factor = tuple(scale_factor)
        self.scale_prob = scale_prob
        self.rotate_factor = rotate_factor
        self.rotate_prob = rotate_prob

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
        """Random (offset (2,) in box sizes, scale factor, rotation in degrees)."""
        t = truncated_normal(rng, 4)
        u = rng.random(3)
        offset = t[:2] * self.shift_factor if u[0] < self.shift_prob else np.zeros(2)
        lo, hi = self.scale_factor
        scale = (hi + lo) * 0.5 + t[2] * (hi - lo) * 0.5 if u[1] < self.scale_prob else 1.0
        rot = t[3] * self.rotate_factor if u[2] < self.rotate_prob else 0.0
        return offset, float(scale), float(rot)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        offset, scale, rot = self.draw(rng)
        c, s = bbox_xyxy_to_cs(sample["bbox"], 1.0)
        c = c + offset * s
        s = s * scale
        _set_box(sample, bbox_cs_to_xyxy(c, s), sample.get("padding", 1.25))
        sample["bbox_rotation"] = rot
        return sample

    def __repr__(self) -> str:
        return (
            f"RandomBBoxTransform(shift={self.shift_factor}@{self.shift_prob}, scale={self.scale_factor}"
            f"@{self.scale_prob}, rotate={self.rotate_factor}@{self.rotate_prob})"
        )


class PhotometricAug:
    """Pixel-level albumentations on the crop (not part of the BMP recipe; off by default in val).

    Args:
        transforms: albumentations transforms to use instead of the default set.
        color_p: probability of a ColorJitter(brightness, contrast, saturation 0.2, hue 0.02).
        blur_p: probability of one Gaussian or motion blur (kernel <= 5).
        noise_p: probability of Gaussian noise (std 1-4 % of the range).
    """

    def __init__(
        self,
        transforms: Sequence[Any] | None = None,
        color_p: float = 0.5,
        blur_p: float = 0.1,
        noise_p: float = 0.1,
    ) -> None:
        import albumentations as A

        if transforms is None:
            transforms = [
                A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=color_p),
                A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.MotionBlur(blur_limit=5, p=1.0)], p=blur_p),
                A.GaussNoise(std_range=(0.01, 0.04), p=noise_p),
            ]
        self.aug = A.Compose(list(transforms))

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        # albumentations keeps its own generator: reseed it from ours so the pipeline stays deterministic
        self.aug.set_random_seed(int(rng.integers(2**31 - 1)))
        sample["img"] = self.aug(image=sample["img"])["image"]
        return sample

    def __repr__(self) -> str:
        return f"PhotometricAug({[type(t).__name__ for t in self.aug.transforms]})"


class GenerateTarget:
    """Crop keypoints -> ``heatmaps`` ``(K, H, W)`` float32 and ``keypoint_weights`` ``(K,)`` float32."""

    draws_random = False

    def __init__(self, codec: UDPHeatmap | None = None) -> None:
        self.codec = codec if codec is not None else UDPHeatmap()

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["heatmaps"], sample["keypoint_weights"] = self.codec.encode(
            sample["keypoints"], sample["keypoints_visible"]
        )
        return sample

    def __repr__(self) -> str:
        c = self.codec
        return f"GenerateTarget(UDPHeatmap(input={c.input_size}, heatmap={c.heatmap_size}, sigma={c.sigma}))"
