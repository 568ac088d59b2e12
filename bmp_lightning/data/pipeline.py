"""Running the top-down transforms of :mod:`bmp_lightning.data.transforms`: the pipelines and their randomness.

* :class:`Compose` is the full-image reference order of BBoxMaskPose (every step sees the whole image); inference
  (``PoseEstimator``, the BMP loop) and the equality tests use it.
* :class:`RoiCompose` runs the same steps region-first (what datasets use): the geometry first, then only the pixel
  box the warp reads is decoded, masked, mirrored and warped; the samples are bit-identical to :class:`Compose`'s.
* :func:`transform_streams`: one random stream per pipeline position, so the order the steps run in changes no draw.
* :func:`build_pose_pipeline`: BBoxMaskPose's train / val pipelines for ViTPose and MaskPose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from bmp_lightning.data.codec import UDPHeatmap
from bmp_lightning.data.crop import Sample, TopdownAffine, image_canvas, source_region, warp_region, warp_scratch
from bmp_lightning.data.transforms import (
    GenerateTarget,
    GetBBoxCenterScale,
    MaskBackground,
    PhotometricAug,
    RandomBBoxTransform,
    RandomFlip,
    RandomHalfBody,
)

__all__ = ["TransformStreams", "transform_streams", "Compose", "RoiCompose", "build_pose_pipeline"]


class TransformStreams(Sequence[np.random.Generator]):
    """Stream ``i`` of :func:`transform_streams`, created when first used (most transforms draw nothing)."""

    __slots__ = ("_key", "_made")

    def __init__(self, key: tuple[int, ...], n: int) -> None:
        self._key = key
        self._made: list[np.random.Generator | None] = [None] * n

    def __len__(self) -> int:
        return len(self._made)

    def of(self, i: int, transform: Any) -> np.random.Generator | None:
        """Stream ``i`` for ``transform``; ``None`` (and nothing built) for a transform that declares
        ``draws_random = False``."""
        return self[i] if getattr(transform, "draws_random", True) else None

    def __getitem__(self, i: int) -> np.random.Generator:  # type: ignore[override]
        g = self._made[i]
        if g is None:
            seq = np.random.SeedSequence([*self._key, i % len(self)])
            g = self._made[i] = np.random.Generator(np.random.PCG64(seq))
        return g


def transform_streams(rng: np.random.Generator, n: int) -> TransformStreams:
    """One independent random stream per pipeline position, derived from the sample's generator.

    A transform's draws then depend only on the sample's seed and its own position in the pipeline, never on how
    many numbers the transforms before it drew; so the region-first pipeline (:class:`RoiCompose`), which runs the
    geometric transforms before ``MaskBackground``, draws exactly what the full-image reference draws. Two 64-bit
    words drawn from ``rng`` (which advances it: a generator reused across samples gives each its own streams) and
    the position seed stream ``i`` through a ``SeedSequence``; streams are built on first use, since building one
    costs ~10 us and most transforms never draw.
    """
    return TransformStreams(tuple(int(v) for v in rng.bit_generator.random_raw(2)), n)


class Compose:
    """Run transforms in order on a shallow copy of the sample, transform ``i`` drawing from stream ``i``
    (:func:`transform_streams`).

    This is the full-image reference order (what BBoxMaskPose runs): every transform sees the whole image.
    Inference (``PoseEstimator``, the BMP loop) and the equality tests of :class:`RoiCompose` use it.
    """

    def __init__(self, transforms: Sequence[Callable[[Sample, np.random.Generator], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = np.random.default_rng() if rng is None else rng
        sample = dict(sample)
        streams = transform_streams(rng, len(self.transforms))
        for i, t in enumerate(self.transforms):
            sample = t(sample, streams.of(i, t))
        return sample

    @property
    def needs_mask(self) -> bool:
        """True when a transform reads the instance mask (so datasets decode it)."""
        return any(isinstance(t, MaskBackground) for t in self.transforms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  " + ",\n  ".join(repr(t) for t in self.transforms) + "\n)"


def _mirror(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a[:, ::-1]`` as a new array (into ``out`` when given)."""
    if a.dtype == np.uint8 and a.ndim in (2, 3) and a.size:
        return cv2.flip(np.asarray(a), 1, dst=out)
    if out is None:
        return np.ascontiguousarray(a[:, ::-1])
    out[...] = a[:, ::-1]
    return out


class RoiCompose(Compose):
    """Region-first execution of the same transforms: the samples of :class:`Compose` at a fraction of the cost.

    The geometric transforms run first, on the box and keypoints only; the warp then tells which pixel box of the
    image the crop samples (:func:`~bmp_lightning.data.crop.source_region`, interpolation margin included), and
    ``MaskBackground`` (mask perturbation included, :meth:`MaskBackground.apply_region`), the flip and the warp
    touch that box only. Every transform draws from its own stream (:func:`transform_streams`), so running
    ``MaskBackground`` after the geometry changes no draw, and the samples (crop, mask, heatmaps, weights) are
    identical to the reference's.

    ``mask`` may be an array or a :class:`~bmp_lightning.structures.masks.RleMask` (``region_first``: what datasets
    check before handing one). Supports pipelines of the shape ``[GetBBoxCenterScale | MaskBackground | RandomFlip |
    RandomHalfBody | RandomBBoxTransform]* TopdownAffine [anything working on the crop]*`` (what
    :func:`build_pose_pipeline` builds).
    """

    _BEFORE_WARP = (GetBBoxCenterScale, MaskBackground, RandomFlip, RandomHalfBody, RandomBBoxTransform)
    # datasets may hand the mask as a lazily decoded RleMask: only the regions read are decoded
    region_first = True

    def __init__(
        self, transforms: Sequence[Callable[[Sample, np.random.Generator], Sample]], warp_mask: bool = True
    ) -> None:
        super().__init__(transforms)
        self.warp_mask = warp_mask
        warps = [i for i, t in enumerate(self.transforms) if isinstance(t, TopdownAffine)]
        if len(warps) != 1:
            raise ValueError(f"RoiCompose needs exactly one TopdownAffine, got {len(warps)}")
        self._warp = warps[0]
        before = self.transforms[: self._warp]
        odd = [type(t).__name__ for t in before if not isinstance(t, self._BEFORE_WARP)]
        if odd or sum(isinstance(t, MaskBackground) for t in before) > 1:
            raise ValueError(f"RoiCompose cannot run {odd or 'two MaskBackground'} before the warp region-first")

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = np.random.default_rng() if rng is None else rng
        streams = transform_streams(rng, len(self.transforms))
        sample = dict(sample)
        img = sample["img"]
        height, width = img.shape[:2]
        masking = None
        for i, t in enumerate(self.transforms[: self._warp]):
            if isinstance(t, MaskBackground):
                masking = i  # runs once the region is known, on its own stream
            elif isinstance(t, RandomFlip):
                t.flip_geometry(sample, streams[i], width)
            else:
                sample = t(sample, streams.of(i, t))
        affine: TopdownAffine = self.transforms[self._warp]
        geometry = affine.geometry(sample)
        mat = geometry[0]
        flip = bool(sample.get("flip", False))
        mask = sample.get("mask")
        if isinstance(img, np.ndarray) and masking is None and not flip and mask is None:  # warp the image as is
            crop = cv2.warpAffine(img, mat, affine.input_size, flags=cv2.INTER_LINEAR)
            return self._after_warp(affine.finish(sample, geometry, crop, None), streams)
        x0, y0, x1, y1 = source_region(mat, affine.input_size, width, height)  # in the (maybe flipped) frame
        box = (width - x1, y0, width - x0, y1) if flip else (x0, y0, x1, y1)
        if not isinstance(img, np.ndarray):  # an EncodedImage: decode the box only, in place on a reused canvas
            img = sample["img"] = img.decode_into(image_canvas(img.shape), box)
            if masking is None and not flip and mask is None:  # the warp reads nothing outside the box
                crop = cv2.warpAffine(img, mat, affine.input_size, flags=cv2.INTER_LINEAR)
                return self._after_warp(affine.finish(sample, geometry, crop, None), streams)
        if masking is not None:
            masker: MaskBackground = self.transforms[masking]
            # unflipped, the dimmed box goes straight to its place in the buffer the warp reads (no copy)
            out = None if flip else warp_scratch((height, width, *img.shape[2:]), img.dtype)[y0:y1, x0:x1]
            region, mask = masker.apply_region(sample, streams.of(masking, masker), box, out)
        else:
            region = img[box[1] : box[3], box[0] : box[2]]
            mask = None if mask is None else mask[box[1] : box[3], box[0] : box[2]]
        if flip:  # mirrored into the warp's buffer by OpenCV (numpy's reversed copy of HxWx3 is ~25x slower)
            buf = warp_scratch((height, width, *region.shape[2:]), region.dtype)
            region = _mirror(region, buf[y0:y1, x0:x1])
            mask = None if mask is None or not self.warp_mask else _mirror(mask)
        if flip or not np.may_share_memory(region, img):  # flipped or masked pixels: warp them from a scratch image
            crop = warp_region(region, mat, (x0, y0), affine.input_size, cv2.INTER_LINEAR, (height, width))
        else:  # untouched pixels: the image itself is the source
            crop = cv2.warpAffine(img, mat, affine.input_size, flags=cv2.INTER_LINEAR)
        if mask is not None and self.warp_mask:
            mask = warp_region(mask, mat, (x0, y0), affine.input_size, cv2.INTER_NEAREST, (height, width))
        elif not self.warp_mask:  # the crop's mask is for visualisation only: datasets do not batch it
            sample.pop("mask", None)
            mask = None
        return self._after_warp(affine.finish(sample, geometry, crop, mask), streams)

    def _after_warp(self, sample: Sample, streams: TransformStreams) -> Sample:
        for i in range(self._warp + 1, len(self.transforms)):
            sample = self.transforms[i](sample, streams.of(i, self.transforms[i]))
        return sample


def build_pose_pipeline(
    train: bool,
    use_mask: bool,
    input_size: Sequence[int] = (192, 256),
    heatmap_size: Sequence[int] = (48, 64),
    sigma: float = 2.0,
    padding: float = 1.25,
    mask_alpha: float = 0.2,
    mask_perturb: bool = True,
    mask_prob: float = 1.0,
    mask_continue_on_failure: bool = False,
    photometric: bool = True,
    flip_prob: float = 0.5,
    half_body_prob: float = 0.3,
    shift_prob: float = 0.3,
    scale_factor: tuple[float, float] = (0.5, 1.5),
    rotate_factor: float = 80.0,
    rotate_prob: float = 0.6,
    val_targets: bool = False,
    roi: bool = True,
    warp_mask: bool = True,
) -> Compose:
    """The top-down pipeline in BBoxMaskPose's order.

    train: center/scale -> [MaskBackground(perturbed)] -> flip -> half-body -> bbox jitter -> UDP affine ->
    [photometric] -> targets. val: center/scale -> [MaskBackground(no perturbation)] -> UDP affine [-> targets if
    ``val_targets``]. ``use_mask`` selects MaskPose (True) or plain ViTPose (False). ``roi``: run it region-first
    (:class:`RoiCompose`, the default for datasets) instead of the full-image reference order (:class:`Compose`).
    ``warp_mask=False``: the region-first pipeline drops the mask instead of warping it to the crop (datasets do
    not batch it; the reference order always warps it).
    """
    ts: list[Any] = [GetBBoxCenterScale(padding)]
    if use_mask:
        ts.append(
            MaskBackground(
                alpha=mask_alpha,
                perturb=train and mask_perturb,
                prob=mask_prob if train else 1.0,
                continue_on_failure=mask_continue_on_failure,
            )
        )
    if train:
        ts += [
            RandomFlip(flip_prob),
            RandomHalfBody(prob=half_body_prob),
            RandomBBoxTransform(
                shift_prob=shift_prob, scale_factor=scale_factor, rotate_factor=rotate_factor, rotate_prob=rotate_prob
            ),
        ]
    ts.append(TopdownAffine(input_size, padding))
    if train and photometric:
        ts.append(PhotometricAug())
    if train or val_targets:
        ts.append(GenerateTarget(UDPHeatmap(input_size, heatmap_size, sigma)))
    return RoiCompose(ts, warp_mask=warp_mask) if roi else Compose(ts)
