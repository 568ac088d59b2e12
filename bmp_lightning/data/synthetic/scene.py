"""Crowded scenes: a textured background, figures composited back-to-front, visible masks and keypoint visibility.

Visibility of a keypoint (COCO convention): 0 outside the image, 1 when the pixel under it belongs to another
person (one drawn in front), 2 otherwise. Self-occlusion is ignored (a wrist in front of or behind its own torso is
visible). Each person's mask holds its *visible* pixels, so the masks of one image never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from bmp_lightning.data.synthetic.figure import Figure, Raster, figure_keypoints, rasterize_figure, sample_figure
from bmp_lightning.structures.keypoints import NUM_KEYPOINTS


@dataclass
class Scene:
    """One rendered image with exact per-person ground truth (persons in painter's order, farthest first)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    keypoints: np.ndarray  # (P, 21, 3) float64: x, y rounded to 0.01 px (exact, also outside the image), v
    masks: np.ndarray  # (P, H, W) uint8 0/1 visible pixels
    amodal_boxes: np.ndarray  # (P, 4) float64 xyxy (pixel edges) of the whole silhouette clipped to the image
    full_areas: np.ndarray  # (P,) int64 silhouette pixels, including those hidden or outside the image
    figures: list[Figure]


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A low-contrast, low-saturation textured background ``(H, W, 3)`` uint8 RGB (walls, floors, blobs, props)."""
    hsv = np.empty((height, width, 3), np.float32)

    def smooth(cell: int, amp: float) -> np.ndarray:
        small = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
        return amp * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)

    hue, sat, val = rng.uniform(0, 360), rng.uniform(0.03, 0.25), rng.uniform(0.38, 0.68)
    yy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    hsv[..., 0] = hue + smooth(24, 8.0)
    hsv[..., 1] = sat + smooth(32, 0.03)
    hsv[..., 2] = val + rng.uniform(-0.12, 0.12) * yy + rng.uniform(-0.08, 0.08) * xx + smooth(12, 0.035)
    kind = int(rng.integers(3))
    if kind == 0:  # wall + floor with faint tiles
        horizon = int(rng.uniform(0.25, 0.6) * height)
        hsv[horizon:, 0] += rng.uniform(-60, 60)
        hsv[horizon:, 2] += rng.uniform(-0.12, 0.12)
        step = int(rng.integers(14, 40))
        tiles = (np.arange(width)[None, :] % step == 0) | (np.arange(height)[:, None] % max(4, step // 2) == 0)
        hsv[horizon:, :, 2] -= 0.04 * tiles[horizon:]
    elif kind == 1:  # stripes / panels
        period = rng.uniform(10, 40)
        t = rng.uniform(0, math.pi)
        grid = (np.arange(width)[None, :] * math.cos(t) + np.arange(height)[:, None] * math.sin(t)) / period
        hsv[..., 2] += 0.04 * np.sign(np.sin(2 * math.pi * grid)).astype(np.float32)
    else:  # large blobs
        hsv[..., 2] += smooth(48, 0.07)
        hsv[..., 0] += smooth(48, 20.0)
    hsv[..., 0] %= 360.0
    hsv[..., 1:] = np.clip(hsv[..., 1:], 0.0, 1.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    # A few low-contrast props (furniture-like boxes and ellipses) so "any blob" is not a person.
    for _ in range(int(rng.integers(0, 4))):
        color = tuple(float(c) for c in np.clip(rgb.mean((0, 1)) * rng.uniform(0.8, 1.2, 3), 0, 255))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sx, sy = rng.uniform(0.05, 0.25) * width, rng.uniform(0.05, 0.3) * height
        if rng.random() < 0.5:
            cv2.rectangle(rgb, (int(cx - sx), int(cy - sy)), (int(cx + sx), int(cy + sy)), color, -1)
        else:
            cv2.ellipse(rgb, (int(cx), int(cy)), (int(sx), int(sy)), 0.0, 0.0, 360.0, color, -1)
    rgb += rng.normal(0.0, 3.0, size=rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _windows(r: Raster, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """Image and canvas slices of the overlap of a raster with the image, or None when they do not overlap."""
    gy0, gx0 = max(0, r.y0), max(0, r.x0)
    gy1, gx1 = min(height, r.y0 + r.ids.shape[0]), min(width, r.x0 + r.ids.shape[1])
    if gy1 <= gy0 or gx1 <= gx0:
        return None
    return slice(gy0, gy1), slice(gx0, gx1), slice(gy0 - r.y0, gy1 - r.y0), slice(gx0 - r.x0, gx1 - r.x0)


def _label_map(rasters: list[Raster], height: int, width: int) -> np.ndarray:
    """``(H, W)`` int16: index of the person owning each pixel (the last drawn wins), -1 for background."""
    labels = np.full((height, width), -1, np.int16)
    for i, r in enumerate(rasters):
        win = _windows(r, height, width)
        if win is None:
            continue
        gy, gx, ly, lx = win
        labels[gy, gx][r.ids[ly, lx] > 0] = i
    return labels


def keypoint_visibility(keypoints: np.ndarray, labels: np.ndarray, index: int) -> np.ndarray:
    """COCO visibility ``(K,)`` of person ``index``'s keypoints ``(K, 2)`` given the scene's label map."""
    height, width = labels.shape
    x, y = keypoints[:, 0], keypoints[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    v = np.zeros(len(keypoints), np.int64)
    xi = np.clip(np.round(x), 0, width - 1).astype(np.int64)
    yi = np.clip(np.round(y), 0, height - 1).astype(np.int64)
    owner = labels[yi, xi]
    covered = (owner >= 0) & (owner != index)
    v[inside] = np.where(covered[inside], 1, 2)
    return v


def render_scene(
    figures: list[Figure],
    image_size: tuple[int, int],
    background: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    noise_sigma: float = 1.5,
    rasters: list[Raster] | None = None,
) -> Scene:
    """Composite ``figures`` (painter's order: first = farthest) over a background.

    ``background``: an RGB uint8 ``(H, W, 3)`` image; drawn from ``rng`` when None (flat grey when both are None).
    """
    height, width = image_size
    if background is None:
        background = (
            render_background(rng, height, width) if rng is not None else np.full((height, width, 3), 128, np.uint8)
        )
    if background.shape != (height, width, 3):
        raise ValueError(f"background shape {background.shape} does not match image_size {image_size}")
    rasters = rasters if rasters is not None else [rasterize_figure(f) for f in figures]
    image = background.copy()
    labels = np.full((height, width), -1, np.int16)
    boxes = np.zeros((len(figures), 4), np.float64)
    for i, r in enumerate(rasters):
        win = _windows(r, height, width)
        if win is None:
            continue
        gy, gx, ly, lx = win
        body = r.ids[ly, lx] > 0
        image[gy, gx][body] = r.rgb[ly, lx][body]
        labels[gy, gx][body] = i
        rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
        if len(rows):
            boxes[i] = (gx.start + cols[0], gy.start + rows[0], gx.start + cols[-1] + 1, gy.start + rows[-1] + 1)
    if noise_sigma > 0 and rng is not None:
        image = np.clip(image + rng.normal(0, noise_sigma, image.shape) + 0.5, 0, 255).astype(np.uint8)

    keypoints = np.zeros((len(figures), NUM_KEYPOINTS, 3), np.float64)
    masks = np.zeros((len(figures), height, width), np.uint8)
    for i, fig in enumerate(figures):
        xy = np.round(figure_keypoints(fig), 2)
        keypoints[i, :, :2] = xy
        keypoints[i, :, 2] = keypoint_visibility(xy, labels, i)
        masks[i] = labels == i
    full = np.array([int((r.ids > 0).sum()) for r in rasters], np.int64)
    return Scene(image=image, keypoints=keypoints, masks=masks, amodal_boxes=boxes, full_areas=full, figures=figures)


def sample_scene(
    rng: np.random.Generator,
    image_size: tuple[int, int] = (256, 320),
    min_people: int = 2,
    max_people: int = 6,
    height_range: tuple[float, float] = (0.35, 0.95),
    min_visible_fraction: float = 0.25,
    min_visible_px: int = 150,
    max_tries: int = 40,
) -> Scene:
    """A random crowded scene: people clustered (heavy mutual occlusion), some cut by the border.

    Each person gets a depth; nearer people are larger, stand lower and are drawn later. Positions of people that
    end up too hidden (visible fraction of their whole silhouette < ``min_visible_fraction`` or fewer than
    ``min_visible_px`` visible pixels) are re-drawn up to ``max_tries`` times; those still too hidden are dropped.
    ``height_range`` is the figure height as a fraction of the image height.
    """
    if not 1 <= min_people <= max_people:
        raise ValueError(f"need 1 <= min_people <= max_people, got {min_people}, {max_people}")
    height, width = image_size
    background = render_background(rng, height, width)
    n = int(rng.integers(min_people, max_people + 1))
    depths = np.sort(rng.uniform(0.0, 1.0, n))  # painter's order: far to near
    cluster_x = rng.uniform(0.3, 0.7) * width
    spread = rng.uniform(0.15, 0.3) * width

    def place(depth: float) -> tuple[float, float]:
        h = height * (height_range[0] + (height_range[1] - height_range[0]) * depth)
        foot = height * (0.5 + 0.55 * depth) + rng.normal(0, 0.06 * height)
        x = float(np.clip(rng.normal(cluster_x, spread), -0.05 * width, 1.05 * width))
        return (x, float(foot - 0.48 * h))

    figures: list[Figure] = []
    for d in depths:
        h = height * (height_range[0] + (height_range[1] - height_range[0]) * d)
        figures.append(sample_figure(rng, place(d), h))
    rasters = [rasterize_figure(f) for f in figures]

    def too_hidden(rs: list[Raster]) -> list[int]:
        labels = _label_map(rs, height, width)
        counts = np.bincount(labels.ravel() + 1, minlength=len(rs) + 1)[1:]
        full = np.array([(r.ids > 0).sum() for r in rs])
        return [i for i in range(len(rs)) if counts[i] < max(min_visible_px, min_visible_fraction * full[i])]

    for _ in range(max_tries):
        bad = too_hidden(rasters)
        if not bad:
            break
        for i in bad:
            figures[i] = replace(figures[i], pelvis=place(float(depths[i])))
            rasters[i] = rasterize_figure(figures[i])
    bad = set(too_hidden(rasters))
    while bad:  # dropping someone can only reveal the others
        keep = [i for i in range(len(figures)) if i not in bad]
        figures, rasters = [figures[i] for i in keep], [rasters[i] for i in keep]
        bad = set(too_hidden(rasters))
    return render_scene(figures, image_size, background=background, rng=rng, rasters=rasters)
