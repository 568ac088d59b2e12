"""The UDP crop of top-down pose: box <-> center/scale, aspect fix, warp matrix, point mapping and ``TopdownAffine``.

Split out of :mod:`bmp_lightning.data.transforms` (which re-exports every name here and holds the rest of the
pipeline). Conventions are those described there: ``bbox`` is the unpadded xyxy working box, ``bbox_center`` /
``bbox_scale`` describe the padded box, and the warp follows UDP (box edges land on crop pixels 0 and ``size - 1``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from bmp_lightning.structures.records import BadSampleError

Sample = dict[str, Any]

__all__ = [
    "TopdownAffine",
    "bbox_xyxy_to_cs",
    "bbox_cs_to_xyxy",
    "fix_aspect_ratio",
    "get_udp_warp_matrix",
    "affine_points",
    "invert_affine",
    "source_region",
    "warp_region",
    "image_canvas",
    "warp_scratch",
]


# ---------------------------------------------------------------------------------------------------- helpers
def _where(sample: Sample) -> str:
    return str(sample.get("where") or sample.get("image_path") or "<sample>")


def bbox_xyxy_to_cs(bbox: np.ndarray, padding: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """xyxy ``(4,)`` -> center ``(2,)`` and scale ``(2,)`` = (w, h) * padding (float64)."""
    bbox = np.asarray(bbox, np.float64)
    center = 0.5 * (bbox[:2] + bbox[2:4])
    scale = (bbox[2:4] - bbox[:2]) * padding
    return center, scale


def bbox_cs_to_xyxy(center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """center/scale ``(2,)`` -> xyxy ``(4,)`` float64."""
    center = np.asarray(center, np.float64)
    scale = np.asarray(scale, np.float64)
    return np.concatenate([center - 0.5 * scale, center + 0.5 * scale])


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Enlarge the shorter side so that w / h == aspect_ratio (``(2,)`` -> ``(2,)``)."""
    w, h = float(scale[0]), float(scale[1])
    if w > h * aspect_ratio:
        return np.array([w, w / aspect_ratio])
    return np.array([h * aspect_ratio, h])


def get_udp_warp_matrix(
    center: Sequence[float], scale: Sequence[float], rot_deg: float, output_size: Sequence[int]
) -> np.ndarray:
    """UDP affine ``(2, 3)`` float64 mapping image pixels to crop pixels.

    The box ``center +- scale / 2`` is rotated by ``rot_deg`` about its center and its edges land on crop pixels
    0 and ``size - 1``: ``p_out = S R (p - center) + scale * S / 2`` with ``S = diag((size - 1) / scale)`` and
    ``R = [[cos, -sin], [sin, cos]]`` (MMPose's sign convention).
    """
    cx, cy = float(center[0]), float(center[1])
    sw, sh = float(scale[0]), float(scale[1])
    if not (sw > 0 and sh > 0 and math.isfinite(sw) and math.isfinite(sh)):
        raise ValueError(f"bbox scale must be positive and finite, got ({sw}, {sh})")
    sx = (output_size[0] - 1) / sw
    sy = (output_size[1] - 1) / sh
    r = math.radians(rot_deg)
    cos, sin = math.cos(r), math.sin(r)
    return np.array(
        [
            [sx * cos, -sx * sin, sx * (-cos * cx + sin * cy + 0.5 * sw)],
            [sy * sin, sy * cos, sy * (-sin * cx - cos * cy + 0.5 * sh)],
        ]
    )


def affine_points(points: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine to ``(..., 2)`` points (float64 result)."""
    points = np.asarray(points, np.float64)
    mat = np.asarray(mat, np.float64)
    return points @ mat[:, :2].T + mat[:, 2]


def invert_affine(mat: np.ndarray) -> np.ndarray:
    """The inverse ``(2, 3)`` affine, computed with exactly the float64 operations ``cv2.warpAffine`` uses to invert
    its matrix (so a warp given this inverse with ``WARP_INVERSE_MAP`` samples the very same source points)."""
    m = [float(v) for v in np.asarray(mat, np.float64).reshape(6)]
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m1, m3 = m[1] * -d, m[3] * -d
    return np.array([[a11, m1, -a11 * m[2] - m1 * m[5]], [m3, a22, -m3 * m[2] - a22 * m[5]]])


def source_region(
    mat: np.ndarray, output_size: Sequence[int], width: int, height: int, margin: int = 2
) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, y0, x1, y1)`` (half-open, inside the image, never empty) of a ``width`` x ``height``
    image that a bilinear or nearest ``cv2.warpAffine(img, mat, output_size)`` reads.

    The crop grid is convex, so its source is the hull of the four mapped corners; ``margin`` covers the second
    bilinear tap and the 1/32-pixel fixed-point rounding of OpenCV's coordinates. A crop that samples nothing of the
    image gets a 1-pixel box at the nearest edge (it reads only the constant border either way). Plain float
    arithmetic: this runs once per sample, where numpy's per-call overhead on 2x3 arrays would dominate.
    """
    w, h = int(output_size[0]), int(output_size[1])
    a, b, c, d, e, f = (float(v) for v in invert_affine(mat).reshape(6))
    xs = [a * u + b * v + c for u, v in ((0.0, 0.0), (w - 1.0, 0.0), (0.0, h - 1.0), (w - 1.0, h - 1.0))]
    ys = [d * u + e * v + f for u, v in ((0.0, 0.0), (w - 1.0, 0.0), (0.0, h - 1.0), (w - 1.0, h - 1.0))]
    x0 = min(max(math.floor(min(xs)) - margin, 0), width - 1)
    y0 = min(max(math.floor(min(ys)) - margin, 0), height - 1)
    x1 = min(max(math.floor(max(xs)) + margin + 1, x0 + 1), width)
    y1 = min(max(math.floor(max(ys)) + margin + 1, y0 + 1), height)
    return x0, y0, x1, y1


_scratch = threading.local()  # one image-sized scratch buffer per thread (DataLoader workers: per process)


def image_canvas(shape: Sequence[int]) -> np.ndarray:
    """A reused, uninitialised uint8 array of ``shape`` (one per thread): where a region-first pipeline decodes the
    box of an image it reads, at the box's place, so that the warp reads it with the image's own coordinates."""
    n = int(np.prod(shape))
    buf = getattr(_scratch, "canvas", None)
    if buf is None or buf.size < n:
        buf = _scratch.canvas = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n].reshape(tuple(int(v) for v in shape))


def warp_region(
    region: np.ndarray,
    mat: np.ndarray,
    offset: Sequence[int],
    output_size: Sequence[int],
    flags: int,
    image_hw: Sequence[int],
) -> np.ndarray:
    """``cv2.warpAffine(img, mat, output_size, flags=flags)``, bit for bit, knowing only ``region =
    img[y0:y1, x0:x1]`` (``offset = (x0, y0)``; it must hold every pixel the warp reads, see :func:`source_region`).

    The region goes into an uninitialised image-sized buffer and the warp runs with the very same matrix: a shifted
    matrix would move OpenCV's float/fixed-point source coordinates by rounding and change a few crop pixels.
    The buffer is reused; what it holds outside the region is never read.
    """
    x0, y0 = int(offset[0]), int(offset[1])
    buf = warp_scratch((int(image_hw[0]), int(image_hw[1]), *region.shape[2:]), region.dtype)
    if not np.may_share_memory(region, buf):  # else it was computed in place (MaskBackground.apply_region's out)
        buf[y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]] = region
    return cv2.warpAffine(buf, mat, (int(output_size[0]), int(output_size[1])), flags=flags)


def warp_scratch(shape: Sequence[int], dtype: Any = np.uint8) -> np.ndarray:
    """The uninitialised image-sized buffer :func:`warp_region` warps from (one per thread, reused: no page faults).
    A region computed straight into it at its place (``warp_scratch(...)[y0:y1, x0:x1]``) is not copied again."""
    n = int(np.prod(shape))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
        buf = _scratch.buf = np.empty(max(n, 1 << 20), dtype)
    return buf[:n].reshape(tuple(int(v) for v in shape))


# ---------------------------------------------------------------------------------------------------- transforms
class TopdownAffine:
    """Warp the person to the model input with the UDP affine.

    center/scale come from the working ``bbox`` x ``padding``; the aspect ratio is fixed to ``w / h`` of
    ``input_size`` by enlarging the short side; rotation is ``bbox_rotation``. Bilinear, constant black border.

    Outputs ``img`` ``(h, w, 3)``, ``keypoints`` ``(K, 2)`` float32 in crop pixels, ``warp_mat`` ``(2, 3)``,
    final ``bbox_center``/``bbox_scale`` (float32, what :func:`~bmp_lightning.data.codec.keypoints_to_image`
    needs), ``input_size``, and the warped ``mask`` if one is present (nearest neighbour, for visualisation).
    """

    draws_random = False  # a deterministic warp (the pipelines build no random stream for it)

    def __init__(self, input_size: Sequence[int] = (192, 256), padding: float = 1.25) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.padding = padding

    def geometry(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The UDP warp ``(2, 3)`` float64 of the sample's working box, and the final center, scale, rotation."""
        w, h = self.input_size
        center, scale = bbox_xyxy_to_cs(sample["bbox"], self.padding)
        scale = fix_aspect_ratio(scale, w / h)
        rot = float(sample.get("bbox_rotation", 0.0))
        try:
            mat = get_udp_warp_matrix(center, scale, rot, (w, h))
        except ValueError as e:
            raise BadSampleError(f"{_where(sample)}: {e}") from e
        return mat, center, scale, rot

    def finish(
        self,
        sample: Sample,
        geometry: tuple[np.ndarray, np.ndarray, np.ndarray, float],
        img: np.ndarray,
        mask: np.ndarray | None,
    ) -> Sample:
        """Store the warped ``img``/``mask`` and the crop bookkeeping of ``geometry`` in the sample."""
        mat, center, scale, rot = geometry
        sample["img"] = img
        if mask is not None:
            sample["mask"] = mask
        sample["keypoints"] = affine_points(np.asarray(sample["keypoints"])[:, :2], mat).astype(np.float32)
        sample["keypoints_visible"] = np.asarray(sample["keypoints_visible"], np.float32)
        sample["warp_mat"] = mat.astype(np.float32)
        sample["bbox"] = np.asarray(sample["bbox"], np.float32)
        sample["bbox_center"] = center.astype(np.float32)
        sample["bbox_scale"] = scale.astype(np.float32)
        sample["bbox_rotation"] = rot
        sample["input_size"] = self.input_size
        return sample

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        geometry = self.geometry(sample)
        mat = geometry[0]
        img = cv2.warpAffine(sample["img"], mat, self.input_size, flags=cv2.INTER_LINEAR)
        mask = sample.get("mask")
        if mask is not None:
            mask = cv2.warpAffine(mask, mat, self.input_size, flags=cv2.INTER_NEAREST)
        return self.finish(sample, geometry, img, mask)

    def __repr__(self) -> str:
        return f"TopdownAffine(input_size={self.input_size}, padding={self.padding})"
