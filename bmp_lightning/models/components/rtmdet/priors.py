"""Point priors of RTMDet (MMDetection ``MlvlPointGenerator`` with offset 0) and the distance box coder.

A level with stride ``s`` and an ``(H, W)`` feature map has priors ``(x*s, y*s, s, s)`` for every cell,
flattened row-major (y outer, x inner), i.e. the order of ``feat.permute(0, 2, 3, 1).reshape(-1, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grid_priors(
    featmap_size: tuple[int, int],
    stride: int | float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    with_stride: bool = True,
) -> torch.Tensor:
    """Priors of one level: ``(H*W, 4)`` ``[x, y, stride, stride]`` (or ``(H*W, 2)`` without stride)."""
    h, w = int(featmap_size[0]), int(featmap_size[1])
    xs = (torch.arange(w, device=device) * stride).to(dtype)
    ys = (torch.arange(h, device=device) * stride).to(dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    points = [xx.reshape(-1), yy.reshape(-1)]
    if with_stride:
        s = torch.full_like(points[0], float(stride))
        points += [s, s]
    return torch.stack(points, dim=-1)


def mlvl_grid_priors(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int | float],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    with_stride: bool = True,
) -> list[torch.Tensor]:
    """Priors of every level: a list of ``(H_l*W_l, 4)`` tensors."""
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"{len(featmap_sizes)} feature maps but {len(strides)} strides")
    return [grid_priors(tuple(sz), s, device, dtype, with_stride) for sz, s in zip(featmap_sizes, strides)]


def distance2bbox(
    points: torch.Tensor, distances: torch.Tensor, max_shape: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(..., 2+)`` points and ``(..., 4)`` (l, t, r, b) distances -> ``(..., 4)`` xyxy; clamped to ``(h, w)``
    with ``max_shape`` (inference), not in training (the criterion)."""
    x1 = points[..., 0] - distances[..., 0]
    y1 = points[..., 1] - distances[..., 1]
    x2 = points[..., 0] + distances[..., 2]
    y2 = points[..., 1] + distances[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes[..., 0::2] = boxes[..., 0::2].clamp(min=0, max=w)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(min=0, max=h)
    return boxes
