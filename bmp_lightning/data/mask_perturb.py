"""Train-time degradation of instance masks, so MaskPose learns to cope with imperfect detector masks.

Recipe of BBoxMaskPose's ``MaskBackground._perturb_mask`` (docs/recipes.md#maskpose-b), with the fork's
defaults erode_prob 0.5, erode_amount 0.5, dilate_prob 0.5, dilate_amount 0.1:

1. with probability ``erode_prob + dilate_prob`` (1.0) perturb at all; always start with a 5x5 open then close;
2. choose *shrink* (prob ``erode_prob / total``) or *enlarge*; each then picks, 50/50, *patches* or *morphology*:
   * shrink / patches: Voronoi-split the foreground into 10 cells, delete ``int(10 * U(0, erode_amount))`` of them;
   * shrink / morphology: open with a square of side ``max(A // 1000, 5)``, erode once with ``max(A // 3000, 5)``;
   * enlarge / patches: the same on the background with 50 cells and ``int(50 * U(0, dilate_amount))`` deletions
     (the deleted background cells join the mask);
   * enlarge / morphology: close with ``max(A // 1000, 5)``, dilate once with ``max(A // 3000, 5)``;
   where A is the foreground pixel count of the (full-image) mask. A patch step that cannot place its seeds (fewer
   pixels than cells) is skipped silently.
3. re-binarise.

All randomness comes from the ``np.random.Generator`` passed in.

:func:`perturb_mask` is the full-image reference. :func:`perturb_mask_region` returns the same perturbed mask for
one pixel box only (what the region-first training pipeline needs): it draws the same numbers in the same order,
takes the kernel sizes and seed sets from the whole mask, runs the morphology on the box plus the kernels' reach
and assigns the box's pixels to their nearest seed with the tie-breaking of SciPy's Euclidean feature transform.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

__all__ = [
    "BRANCHES",
    "morph_kernel_sizes",
    "open_close",
    "shrink_by_morphology",
    "enlarge_by_morphology",
    "remove_voronoi_cells",
    "perturb_mask",
    "perturb_mask_region",
    "nearest_seed",
]

BRANCHES = ("shrink_patches", "shrink_morphology", "enlarge_patches", "enlarge_morphology")


def morph_kernel_sizes(area: int) -> tuple[int, int]:
    """Square kernel sides ``(open/close, erode/dilate)`` for a mask of ``area`` pixels: A//1000 and A//3000, >= 5."""
    return max(int(area) // 1000, 5), max(int(area) // 3000, 5)


def _square(k: int) -> np.ndarray:
    return np.ones((k, k), np.uint8)


def open_close(mask: np.ndarray, k: int = 5) -> np.ndarray:
    """Morphological open then close with a ``k x k`` square (removes specks, fills pinholes)."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _square(k))
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _square(k))


def shrink_by_morphology(mask: np.ndarray) -> np.ndarray:
    """Open (cuts thin limbs) then erode, with area-scaled kernels."""
    k_big, k_small = morph_kernel_sizes(int((mask > 0).sum()))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _square(k_big))
    return cv2.erode(mask, _square(k_small), iterations=1)


def enlarge_by_morphology(mask: np.ndarray) -> np.ndarray:
    """Close (fills gaps between limbs) then dilate, with area-scaled kernels."""
    k_big, k_small = morph_kernel_sizes(int((mask > 0).sum()))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _square(k_big))
    return cv2.dilate(mask, _square(k_small), iterations=1)


def remove_voronoi_cells(mask: np.ndarray, rng: np.random.Generator, amount: float, num_cells: int) -> np.ndarray:
    """Split the foreground of ``mask`` into ``num_cells`` Voronoi cells around random foreground seeds and delete
    ``int(num_cells * U(0, amount))`` of them.

    Raises:
        ValueError: fewer foreground pixels than cells (the caller skips the step, as upstream does).
    """
    fg = np.flatnonzero(mask.reshape(-1) > 0)
    if len(fg) < num_cells:
        raise ValueError(f"{len(fg)} foreground pixels cannot seed {num_cells} Voronoi cells")
    seeds = rng.choice(fg, num_cells, replace=False)
    seed_labels = np.zeros(mask.shape, np.int32)
    seed_labels.reshape(-1)[seeds] = np.arange(1, num_cells + 1)
    # nearest seed of every pixel = the seed the EDT of the non-seed pixels points to
    _, (iy, ix) = distance_transform_edt(seed_labels == 0, return_indices=True)
    labels = seed_labels[iy, ix] * (mask > 0)
    n_remove = int(num_cells * rng.uniform(0.0, amount))
    if n_remove == 0:
        return mask.copy()
    remove = rng.choice(np.arange(1, num_cells + 1), n_remove, replace=False)
    return (mask * ~np.isin(labels, remove)).astype(mask.dtype)


def perturb_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    erode_prob: float = 0.5,
    erode_amount: float = 0.5,
    dilate_prob: float = 0.5,
    dilate_amount: float = 0.1,
    return_branch: bool = False,
) -> np.ndarray | tuple[np.ndarray, str | None]:
    """Degrade an ``(H, W)`` uint8 0/1 mask as a detector might; returns a 0/1 uint8 mask (and the branch name)."""
    if not 0 <= erode_prob + dilate_prob <= 1:
        raise ValueError(f"erode_prob + dilate_prob must lie in [0, 1], got {erode_prob} + {dilate_prob}")
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    noise_prob = erode_prob + dilate_prob
    branch: str | None = None
    if noise_prob > 0 and rng.random() < noise_prob:
        mask = open_close(mask, 5)
        enlarge = rng.random() < dilate_prob / noise_prob
        patches = rng.random() < 0.5
        branch = ("enlarge_" if enlarge else "shrink_") + ("patches" if patches else "morphology")
        if branch == "shrink_patches":
            try:
                mask = remove_voronoi_cells(mask, rng, erode_amount, 10)
            except ValueError:
                pass
        elif branch == "enlarge_patches":
            try:
                mask = 1 - remove_voronoi_cells(1 - mask, rng, dilate_amount, 50)
            except ValueError:
                pass
        elif branch == "shrink_morphology":
            mask = shrink_by_morphology(mask)
        else:
            mask = enlarge_by_morphology(mask)
        mask = (mask > 0).astype(np.uint8)
    return (mask, branch) if return_branch else mask


# ---------------------------------------------------------------------------------------------------- region-first
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (half-open pixel box)


def nearest_seed(ys: np.ndarray, xs: np.ndarray, seed_y: np.ndarray, seed_x: np.ndarray) -> np.ndarray:
    """Index of the nearest seed of each pixel ``(ys, xs)`` (flat int arrays), exactly as
    ``distance_transform_edt(..., return_indices=True)`` picks it.

    SciPy's separable transform scans columns first, then rows, keeping the earlier candidate on a tie: among the
    seeds at the smallest squared distance it returns the one with the smallest column, then the smallest row. The
    squared distance and that rank are packed in one integer so one ``min`` does both.
    """
    order = np.lexsort((seed_y, seed_x))
    sy = np.asarray(seed_y, np.int64)[order]
    sx = np.asarray(seed_x, np.int64)[order]
    bits = int(len(order)).bit_length()
    extent = max(int(np.max(ys, initial=0)), int(sy.max(initial=0)))
    extent += max(int(np.max(xs, initial=0)), int(sx.max(initial=0)))
    dtype = np.int32 if (extent + 1) ** 2 << bits < 2**31 else np.int64  # int32 halves the memory traffic
    ys = np.asarray(ys, dtype)
    xs = np.asarray(xs, dtype)
    key = (((ys[:, None] - sy.astype(dtype)) ** 2 + (xs[:, None] - sx.astype(dtype)) ** 2) << bits) | np.arange(
        len(order), dtype=dtype
    )
    return order[key.min(axis=1) & ((1 << bits) - 1)]


def _window_box(mask: np.ndarray, margin: int) -> Box:
    """The foreground's bounding box grown by ``margin`` (clipped; a 0x0 box for an empty mask)."""
    if hasattr(mask, "bbox"):  # a lazily decoded RleMask: from its runs
        x0, y0, x1, y1 = mask.bbox()
        x, y, w, h = x0, y0, x1 - x0, y1 - y0
    else:
        x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, np.uint8) if mask.dtype == bool else mask)
    if w == 0 or h == 0:
        return 0, 0, 0, 0
    hh, ww = mask.shape[:2]
    return max(x - margin, 0), max(y - margin, 0), min(x + w + margin, ww), min(y + h + margin, hh)


def _read(win: np.ndarray, wbox: Box, box: Box) -> np.ndarray:
    """The pixels of ``box`` of a full-size mask that is ``win`` inside ``wbox`` and 0 elsewhere."""
    x0, y0, x1, y1 = box
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    ix0, iy0 = max(x0, wbox[0]), max(y0, wbox[1])
    ix1, iy1 = min(x1, wbox[2]), min(y1, wbox[3])
    if ix1 > ix0 and iy1 > iy0:
        src = win[iy0 - wbox[1] : iy1 - wbox[1], ix0 - wbox[0] : ix1 - wbox[0]]
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = src
    return out


def _grow(box: Box, r: int, shape: tuple[int, int]) -> Box:
    return max(box[0] - r, 0), max(box[1] - r, 0), min(box[2] + r, shape[1]), min(box[3] + r, shape[0])


def cells_in_box(
    members: np.ndarray,
    origin: tuple[int, int],
    seed_y: np.ndarray,
    seed_x: np.ndarray,
    chosen: np.ndarray,
    tile: int = 16,
) -> np.ndarray:
    """Which ``members`` (a box-shaped bool array at image ``origin = (x0, y0)``) lie in the Voronoi cell of a
    ``chosen`` seed (``chosen``: bool per seed), with :func:`nearest_seed`'s tie-breaking.

    Per ``tile`` x ``tile`` block only the seeds that can be nearest to one of its pixels are candidates (a seed
    whose distance to the block exceeds another seed's farthest distance never is); a block whose candidates are all
    chosen, or none, is settled at once, and only the blocks on a cell border are resolved pixel by pixel.
    """
    hb, wb = members.shape
    out = np.zeros((hb, wb), bool)
    if not members.any() or not chosen.any():
        return out
    sy = np.asarray(seed_y, np.int64)
    sx = np.asarray(seed_x, np.int64)

    def bounds(lo: np.ndarray, hi: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        near = np.maximum(np.maximum(lo[:, None] - s, s - hi[:, None]), 0)
        far = np.maximum(np.abs(s - lo[:, None]), np.abs(s - hi[:, None]))
        return near**2, far**2

    ylo = np.arange(0, hb, tile) + origin[1]
    xlo = np.arange(0, wb, tile) + origin[0]
    ny_lb, ny_ub = bounds(ylo, np.minimum(ylo + tile, hb + origin[1]) - 1, sy)  # (tiles_y, seeds)
    nx_lb, nx_ub = bounds(xlo, np.minimum(xlo + tile, wb + origin[0]) - 1, sx)
    lb = ny_lb[:, None, :] + nx_lb[None, :, :]  # (tiles_y, tiles_x, seeds)
    ub = (ny_ub[:, None, :] + nx_ub[None, :, :]).min(axis=-1)
    cand = lb <= ub[..., None]
    n_chosen = (cand & chosen).sum(-1)
    settled = n_chosen == cand.sum(-1)  # every candidate chosen: the whole block is
    mixed = (n_chosen > 0) & ~settled

    def expand(t: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(t, tile, 0), tile, 1)[:hb, :wb]

    out = expand(settled) & members
    if mixed.any():
        py, px = np.nonzero(expand(mixed) & members)
        sub = np.flatnonzero(cand[mixed].any(0))
        nearest = nearest_seed(py + origin[1], px + origin[0], sy[sub], sx[sub])
        out[py, px] = chosen[sub][nearest]
    return out


def _kth_in_rows(
    pos: np.ndarray, row_counts: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], y0: int, x0: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of the ``pos``-th members (raster order) of a set with ``row_counts`` members per row;
    ``rows(r)`` gives the bool membership of rows ``r`` (offset ``y0``, ``x0`` to image coordinates)."""
    ends = np.cumsum(row_counts)
    r = np.searchsorted(ends, pos, side="right")
    k = pos - (ends[r] - row_counts[r])  # index within its row
    col = np.argmax(np.cumsum(rows(r), axis=1) > k[:, None], axis=1)
    return r + y0, col + x0


def _remove_cells_region(
    n_pixels: int,
    to_yx,
    rng: np.random.Generator,
    amount: float,
    num_cells: int,
    members: np.ndarray,
    origin: tuple[int, int],
) -> np.ndarray | None:
    """:func:`remove_voronoi_cells` for the box-shaped ``members`` of the set being split; True = deleted.

    ``n_pixels`` is the size of the whole set and ``to_yx(positions)`` the image coordinates of its
    ``positions``-th pixels in raster order (what ``rng.choice`` over the flat indices picks). None: nothing deleted.
    """
    if n_pixels < num_cells:
        raise ValueError(f"{n_pixels} foreground pixels cannot seed {num_cells} Voronoi cells")
    # rng.choice(array, n) == array[rng.choice(len(array), n)]: the same draw without listing the pixels
    seed_y, seed_x = to_yx(rng.choice(n_pixels, num_cells, replace=False))
    n_remove = int(num_cells * rng.uniform(0.0, amount))
    if n_remove == 0:
        return None
    remove = rng.choice(np.arange(1, num_cells + 1), n_remove, replace=False)
    removed = np.zeros(num_cells, bool)
    removed[remove - 1] = True
    return cells_in_box(members, origin, seed_y, seed_x, removed)


def perturb_mask_region(
    mask: np.ndarray,
    box: Box,
    rng: np.random.Generator,
    erode_prob: float = 0.5,
    erode_amount: float = 0.5,
    dilate_prob: float = 0.5,
    dilate_amount: float = 0.1,
    return_branch: bool = False,
) -> np.ndarray | tuple[np.ndarray, str | None]:
    """``perturb_mask(mask, rng, ...)[y0:y1, x0:x1]`` for ``box = (x0, y0, x1, y1)``, without the full-image work.

    ``mask``: an ``(H, W)`` array or a lazily decoded :class:`~bmp_lightning.structures.masks.RleMask` (only the box and
    the foreground's bounding box are decoded).

    Same draws in the same order as :func:`perturb_mask`. The 5x5 open/close runs on the foreground's bounding box
    (+ 8 px, where its result is confined); kernel sizes come from that whole opened mask's area; the area-scaled
    morphology runs on the box grown by the kernels' reach; Voronoi seeds are drawn over the whole mask (or the whole
    background) and only the box's pixels are assigned to them.
    """
    if not 0 <= erode_prob + dilate_prob <= 1:
        raise ValueError(f"erode_prob + dilate_prob must lie in [0, 1], got {erode_prob} + {dilate_prob}")
    x0, y0, x1, y1 = box
    shape = mask.shape[:2]
    noise_prob = erode_prob + dilate_prob
    if not (noise_prob > 0 and rng.random() < noise_prob):
        out = (np.asarray(mask[y0:y1, x0:x1]) > 0).astype(np.uint8)
        return (out, None) if return_branch else out
    wbox = _window_box(mask, 8)
    win = (mask[wbox[1] : wbox[3], wbox[0] : wbox[2]] > 0).astype(np.uint8)
    if win.size:
        win = open_close(win, 5)  # confined to the foreground's box + 2 px, so the window holds all of it
    enlarge = rng.random() < dilate_prob / noise_prob
    patches = rng.random() < 0.5
    branch = ("enlarge_" if enlarge else "shrink_") + ("patches" if patches else "morphology")
    out = _read(win, wbox, box)
    # the opened mask is `win` inside `wbox`, 0 elsewhere; rows are counted, pixels are not listed
    row_fg = win.sum(axis=1, dtype=np.int64)
    n_fg = int(row_fg.sum())
    height, width = shape
    if branch == "shrink_patches":

        def fg_yx(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _kth_in_rows(pos, row_fg, lambda r: win[r] > 0, wbox[1], wbox[0])

        try:
            deleted = _remove_cells_region(n_fg, fg_yx, rng, erode_amount, 10, out > 0, (x0, y0))
        except ValueError:
            deleted = None
        if deleted is not None:
            out[deleted] = 0
    elif branch == "enlarge_patches":
        row_bg = np.full(height, width, np.int64)
        row_bg[wbox[1] : wbox[3]] -= row_fg

        def bg_rows(r: np.ndarray) -> np.ndarray:
            rows = np.zeros((len(r), width), np.uint8)
            inside = (r >= wbox[1]) & (r < wbox[3])
            rows[inside, wbox[0] : wbox[2]] = win[r[inside] - wbox[1]]
            return rows == 0

        try:
            deleted = _remove_cells_region(
                height * width - n_fg,
                lambda pos: _kth_in_rows(pos, row_bg, bg_rows, 0, 0),
                rng,
                dilate_amount,
                50,
                out == 0,
                (x0, y0),
            )
        except ValueError:
            deleted = None
        if deleted is not None:
            out[deleted] = 1  # deleted background cells join the mask
    else:
        k_big, k_small = morph_kernel_sizes(n_fg)
        reach = 2 * k_big + k_small + 2  # open/close + erode/dilate never look further
        grown = _grow(box, reach, shape)
        local = _read(win, wbox, grown)
        if branch == "shrink_morphology":
            local = cv2.morphologyEx(local, cv2.MORPH_OPEN, _square(k_big))
            local = cv2.erode(local, _square(k_small), iterations=1)
        else:
            local = cv2.morphologyEx(local, cv2.MORPH_CLOSE, _square(k_big))
            local = cv2.dilate(local, _square(k_small), iterations=1)
        out = np.ascontiguousarray(local[y0 - grown[1] : y1 - grown[1], x0 - grown[0] : x1 - grown[0]])
    out = (out > 0).astype(np.uint8)
    return (out, branch) if return_branch else out
