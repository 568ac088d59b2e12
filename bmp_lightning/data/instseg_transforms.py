"""Instance-segmentation (RTMDet-Ins) data transforms on dict samples.

A sample is a dict with
    ``img``    ``(H, W, 3)`` RGB uint8,
    ``boxes``  ``(M, 4)`` float32 xyxy pixels,
    ``labels`` ``(M,)`` int64,
    ``masks``  ``(M, H, W)`` uint8 0/1,
plus optional meta keys kept up to date where a transform changes them: ``scale_factor`` ``(w, h)`` of the last
resize, ``img_shape`` ``(h, w)`` of the content before padding, ``flip``.

Every transform is ``t(sample, rng) -> sample | None`` with a ``numpy.random.Generator``; ``None`` means "drop this
sample and draw another" (only :class:`FilterAnnotations` does that, as upstream). The geometry follows
MMDetection 3.x (``rtmdet-ins_l_8xb32-300e_coco.py``): keep-ratio resize with ``int(x * f + 0.5)`` sizes, bilinear
images / nearest masks, crop offsets uniform in ``[0, margin]``, boxes recomputed from cropped masks with the
``+1`` max edge, bottom/right padding.

Difference from upstream, on purpose: masks travel as bitmaps (nearest-neighbour resize), whereas upstream loads
polygons (``poly2mask=False``), transforms their coordinates and rasterises at the end; recomputed boxes here are
tight pixel boxes (``+1`` max edge) rather than polygon extents, i.e. up to about a pixel larger.

``RemoveRandomInstances`` is our documented reconstruction of BMP's unpublished "mask-out" augmentation
(docs/departures.md#removerandominstances).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from bmp_lightning.structures.mask_ops import mask_out

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], "Sample | None"]

# ImageNet mean in RGB order, the 'mean' fill of RemoveRandomInstances.
MEAN_RGB = (124, 116, 104)


class Compose:
    """Apply transforms in order; stops and returns ``None`` as soon as one drops the sample."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample | None:
        for t in self.transforms:
            sample = t(sample, rng)
            if sample is None:
                return None
        return sample

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"


def _resize_masks(masks: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of ``(M, H, W)`` masks to ``(M, height, width)`` (cv2, up to 512 channels a call)."""
    if masks.shape[0] == 0:
        return np.zeros((0, height, width), np.uint8)
    out = []
    for start in range(0, masks.shape[0], 512):
        chunk = np.ascontiguousarray(masks[start : start + 512].transpose(1, 2, 0))
        res = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_NEAREST)
        out.append(res.reshape(height, width, -1).transpose(2, 0, 1))
    return np.ascontiguousarray(np.concatenate(out, axis=0))


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int, float]:
    """Keep-ratio target size (mmcv ``rescale_size``): factor ``min(long/max(h,w), short/min(h,w))``.

    Returns:
        ``(new_h, new_w, factor)`` with ``new = int(old * factor + 0.5)``.
    """
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5), f


def resize_sample(sample: Sample, new_h: int, new_w: int) -> Sample:
    """Resize image (bilinear), masks (nearest) and boxes (scaled, clipped) to ``(new_h, new_w)``."""
    img = sample["img"]
    h, w = img.shape[:2]
    sx, sy = new_w / w, new_h / h
    out = dict(sample)
    out["img"] = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    boxes = sample["boxes"].astype(np.float32) * np.array([sx, sy, sx, sy], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
    out["boxes"] = boxes
    if "masks" in sample:
        out["masks"] = _resize_masks(sample["masks"], new_w, new_h)
    out["scale_factor"] = (sx, sy)
    out["img_shape"] = (new_h, new_w)
    return out


class Resize:
    """Deterministic resize to ``scale``; with ``keep_ratio`` the image fits inside it (test time: 640x640).

    Args:
        scale: ``(w, h)`` target (only ``max``/``min`` matter with ``keep_ratio``).
        keep_ratio: keep the aspect ratio (mmcv ``rescale_size``); otherwise stretch to ``scale``.
    """

    def __init__(self, scale: tuple[int, int] | int = (640, 640), keep_ratio: bool = True) -> None:
        self.scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
        self.keep_ratio = keep_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        h, w = sample["img"].shape[:2]
        if self.keep_ratio:
            new_h, new_w, _ = rescale_size(h, w, self.scale)
        else:
            new_w, new_h = self.scale
        return resize_sample(sample, new_h, new_w)

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio})"


class RandomResize:
    """Large-scale jitter: ``scale * U(ratio_range)`` then a keep-ratio resize (mmdet ``RandomResize``).

    Args:
        scale: ``(w, h)`` base scale (1280x1280 stage 1, 640x640 stage 2).
        ratio_range: the uniform range of the multiplier.
        keep_ratio: as :class:`Resize`.
    """

    def __init__(
        self,
        scale: tuple[int, int] | int = (1280, 1280),
        ratio_range: tuple[float, float] = (0.1, 2.0),
        keep_ratio: bool = True,
    ) -> None:
        self.scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.keep_ratio = keep_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return Resize(target, self.keep_ratio)(sample)

    def __repr__(self) -> str:
        return f"RandomResize(scale={self.scale}, ratio_range={self.ratio_range}, keep_ratio={self.keep_ratio})"


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight ``(M, 4)`` xyxy boxes of ``(M, H, W)`` masks; max edge ``+1`` (pixel i spans [i, i+1)); 0s if empty."""
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    if masks.shape[0] == 0:
        return boxes
    cols = masks.any(axis=1)  # (M, W)
    rows = masks.any(axis=2)  # (M, H)
    for i in range(masks.shape[0]):
        xs, ys = np.flatnonzero(cols[i]), np.flatnonzero(rows[i])
        if xs.size and ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def _select(sample: Sample, keep: np.ndarray) -> Sample:
    out = dict(sample)
    out["boxes"] = sample["boxes"][keep]
    out["labels"] = sample["labels"][keep]
    if "masks" in sample:
        out["masks"] = sample["masks"][keep]
    return out


class RandomCrop:
    """Random ``crop_size`` window (whole image along a side that is smaller), mmdet ``RandomCrop`` (absolute).

    Boxes are shifted and clipped; instances whose clipped box does not overlap the window are dropped; masks are
    cropped and, with ``recompute_bbox``, the boxes are recomputed from them.

    Args:
        crop_size: ``(h, w)`` of the window.
        recompute_bbox: tight boxes from the cropped masks.
        allow_negative_crop: keep crops without any instance (else the sample is dropped).
    """

    def __init__(
        self,
        crop_size: tuple[int, int] | int = (640, 640),
        recompute_bbox: bool = True,
        allow_negative_crop: bool = True,
    ) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.recompute_bbox = recompute_bbox
        self.allow_negative_crop = allow_negative_crop

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample | None:
        img = sample["img"]
        h, w = img.shape[:2]
        margin_h, margin_w = max(h - self.crop_size[0], 0), max(w - self.crop_size[1], 0)
        oy, ox = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        y2, x2 = oy + self.crop_size[0], ox + self.crop_size[1]
        out = dict(sample)
        out["img"] = np.ascontiguousarray(img[oy:y2, ox:x2])
        ch, cw = out["img"].shape[:2]
        boxes = sample["boxes"].astype(np.float32) - np.array([ox, oy, ox, oy], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
        valid = (boxes[:, 0] < cw) & (boxes[:, 1] < ch) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
        if not valid.any() and not self.allow_negative_crop:
            return None
        out["boxes"] = boxes
        out = _select(out, valid)
        if "masks" in out:
            out["masks"] = np.ascontiguousarray(out["masks"][:, oy:y2, ox:x2])
            if self.recompute_bbox:
                out["boxes"] = masks_to_boxes(out["masks"])
        out["img_shape"] = (ch, cw)
        return out

    def __repr__(self) -> str:
        return (
            f"RandomCrop(crop_size={self.crop_size}, recompute_bbox={self.recompute_bbox}, "
            f"allow_negative_crop={self.allow_negative_crop})"
        )


class YOLOXHSVRandomAug:
    """HSV jitter: integer gains ``U(-1,1) * (hue, sat, val)``, each channel's gain kept with probability 0.5.

    Hue wraps modulo 180 (OpenCV's 8-bit hue), saturation and value are clipped to [0, 255].
    """

    def __init__(self, hue_delta: int = 5, saturation_delta: int = 30, value_delta: int = 30) -> None:
        self.deltas = np.array([hue_delta, saturation_delta, value_delta], np.float64)

    def gains(self, rng: np.random.Generator) -> np.ndarray:
        g = rng.uniform(-1, 1, 3) * self.deltas
        g *= rng.integers(0, 2, 3)
        return g.astype(np.int16)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        g = self.gains(rng)
        hsv = cv2.cvtColor(sample["img"], cv2.COLOR_RGB2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + g[0]) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + g[1], 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + g[2], 0, 255)
        out = dict(sample)
        out["img"] = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
        return out

    def __repr__(self) -> str:
        return f"YOLOXHSVRandomAug(deltas={self.deltas.astype(int).tolist()})"


def hflip_sample(sample: Sample) -> Sample:
    """Mirror image, masks and boxes left-right (``x1' = W - x2``)."""
    out = dict(sample)
    w = sample["img"].shape[1]
    out["img"] = np.ascontiguousarray(sample["img"][:, ::-1])
    boxes = sample["boxes"].astype(np.float32).copy()
    boxes[:, [0, 2]] = w - sample["boxes"][:, [2, 0]]
    out["boxes"] = boxes
    if "masks" in sample:
        out["masks"] = np.ascontiguousarray(sample["masks"][:, :, ::-1])
    out["flip"] = not sample.get("flip", False)
    return out


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return hflip_sample(sample) if rng.random() < self.prob else sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class Pad:
    """Pad bottom/right to ``size`` ``(h, w)``: image with ``pad_val``, masks with 0."""

    def __init__(self, size: tuple[int, int] | int = (640, 640), pad_val: int = 114) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.pad_val = pad_val

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        img = sample["img"]
        h, w = img.shape[:2]
        th, tw = self.size
        if h > th or w > tw:
            raise ValueError(f"Pad: image {h}x{w} is larger than the pad size {th}x{tw}")
        out = dict(sample)
        canvas = np.full((th, tw, img.shape[2]), self.pad_val, dtype=img.dtype)
        canvas[:h, :w] = img
        out["img"] = canvas
        if "masks" in sample:
            masks = np.zeros((sample["masks"].shape[0], th, tw), np.uint8)
            masks[:, :h, :w] = sample["masks"]
            out["masks"] = masks
        out.setdefault("img_shape", (h, w))
        return out

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, pad_val={self.pad_val})"


class FilterAnnotations:
    """Drop instances whose box is not larger than ``min_gt_bbox_wh`` (strictly, as mmdet).

    With ``keep_empty`` (upstream default) a sample that *had* instances but loses them all is dropped (``None``)
    so the dataset draws another; a sample that arrives without instances (a negative crop) passes.
    """

    def __init__(self, min_gt_bbox_wh: tuple[float, float] = (1.0, 1.0), keep_empty: bool = True) -> None:
        self.min_wh = tuple(min_gt_bbox_wh)
        self.keep_empty = keep_empty

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample | None:
        boxes = sample["boxes"]
        if boxes.shape[0] == 0:
            return sample
        keep = ((boxes[:, 2] - boxes[:, 0]) > self.min_wh[0]) & ((boxes[:, 3] - boxes[:, 1]) > self.min_wh[1])
        if not keep.any() and self.keep_empty:
            return None
        return _select(sample, keep)

    def __repr__(self) -> str:
        return f"FilterAnnotations(min_gt_bbox_wh={self.min_wh}, keep_empty={self.keep_empty})"


class RemoveRandomInstances:
    """BMP's "mask-out" augmentation (our reconstruction): hide some people and drop their targets.

    With probability ``prob``, for an image with at least two eligible people (``labels == person_label`` and a
    non-empty mask), draw ``k`` uniformly in ``[1, n-1]`` and then ``k`` distinct people uniformly: a random non-empty
    *proper* subset, so at least one person always stays. Their mask pixels are painted with ``fill`` on the RGB
    image and their boxes, labels and masks are removed, so the holes become background, as in the BMP loop where
    found people are painted black before the next detection pass.

    Args:
        prob: probability of acting on an image (0 = identity).
        fill: ``'black'`` (0, what the loop paints at inference), ``'mean'`` (ImageNet mean colour) or ``'noise'``
            (uniform random RGB per pixel).
        dilate: grow the painted region by this many pixels (elliptic kernel); the growth never covers the masks
            of the people who stay. The painting is the BMP loop's :func:`~bmp_lightning.structures.mask_ops.mask_out`
            (``mode='pixels'``).
        person_label: the label of eligible instances; ``None`` makes every instance eligible.
    """

    FILLS = ("black", "mean", "noise")

    def __init__(self, prob: float = 0.5, fill: str = "black", dilate: int = 0, person_label: int | None = 0) -> None:
        if fill not in self.FILLS:
            raise ValueError(f"RemoveRandomInstances: fill must be one of {self.FILLS}, got {fill!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RemoveRandomInstances: prob must be in [0, 1], got {prob}")
        if dilate < 0:
            raise ValueError(f"RemoveRandomInstances: dilate must be >= 0, got {dilate}")
        self.prob = prob
        self.fill = fill
        self.dilate = int(dilate)
        self.person_label = person_label

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.prob <= 0 or rng.random() >= self.prob:
            return sample
        masks, labels = sample["masks"], sample["labels"]
        eligible = masks.reshape(masks.shape[0], -1).any(axis=1)
        if self.person_label is not None:
            eligible &= labels == self.person_label
        cand = np.flatnonzero(eligible)
        if cand.size < 2:
            return sample
        k = int(rng.integers(1, cand.size))  # 1 .. n-1
        removed = np.sort(rng.choice(cand, size=k, replace=False))
        keep = np.ones(masks.shape[0], bool)
        keep[removed] = False

        fill = {"black": 0, "mean": MEAN_RGB, "noise": "noise"}[self.fill]
        img = mask_out(
            sample["img"], masks[removed], "pixels", fill=fill, dilate=self.dilate, protect=masks[keep], rng=rng
        )
        out = _select(sample, keep)
        out["img"] = img
        return out

    def __repr__(self) -> str:
        return (
            f"RemoveRandomInstances(prob={self.prob}, fill={self.fill!r}, dilate={self.dilate}, "
            f"person_label={self.person_label})"
        )


def build_train_pipeline(
    stage: int = 1,
    input_size: int = 640,
    scale: int = 1280,
    stage2_scale: int | None = None,
    ratio_range: tuple[float, float] = (0.1, 2.0),
    remove_prob: float = 0.0,
    remove_fill: str = "black",
    remove_dilate: int = 0,
    person_label: int | None = 0,
    hsv: tuple[int, int, int] = (5, 30, 30),
    flip_prob: float = 0.5,
    pad_val: int = 114,
    min_gt_bbox_wh: tuple[float, float] = (1.0, 1.0),
) -> Compose:
    """The RTMDet-Ins fine-tuning pipeline (docs/recipes.md#mask-out-fine-tune; Mosaic/MixUp are off there).

    Stage 1: [RemoveRandomInstances] -> RandomResize(scale) -> RandomCrop -> HSV -> Flip -> Pad -> FilterAnnotations.
    Stage 2 (last epochs): no RemoveRandomInstances, RandomResize at ``stage2_scale`` (default ``input_size``).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    ts: list[Transform] = []
    if stage == 1 and remove_prob > 0:
        ts.append(RemoveRandomInstances(remove_prob, remove_fill, remove_dilate, person_label))
    s = scale if stage == 1 else (stage2_scale or input_size)
    ts += [
        RandomResize((s, s), ratio_range, keep_ratio=True),
        RandomCrop((input_size, input_size), recompute_bbox=True, allow_negative_crop=True),
        YOLOXHSVRandomAug(*hsv),
        RandomFlip(flip_prob),
        Pad((input_size, input_size), pad_val),
        FilterAnnotations(min_gt_bbox_wh),
    ]
    return Compose(ts)


def build_test_pipeline(input_size: int = 640, pad_val: int = 114) -> Compose:
    """Test time: keep-ratio resize into ``input_size`` then bottom/right pad with ``pad_val``."""
    return Compose([Resize((input_size, input_size), keep_ratio=True), Pad((input_size, input_size), pad_val)])
