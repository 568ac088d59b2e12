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
"""

from __future__ import annotations

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
