"""Top-down heatmap pose network (backbone + heatmap head) and the ViTPose / MaskPose presets.

MaskPose-B is ViTPose-B with 21 heatmaps: the mask enters through the input image (background dimmed), not through
new parameters (docs/method.md#maskpose).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from bmp_lightning.models.components.heatmap_head import HeatmapHead
from bmp_lightning.models.components.vit import ViTPoseBackbone


class ViTSize(NamedTuple):
    """A ViT backbone size: width, depth, attention heads and MMPose's drop-path rate for it."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float


# The one size table (MMPose's td-hm_ViTPose-{small,base,large,huge}_8xb64-210e_coco-256x192.py): the presets below,
# the head count of converted weights (not stored in them: qkv is fused) and convert's preset detection read it.
VITPOSE_SIZES: dict[str, ViTSize] = {
    "vitpose_s": ViTSize(384, 12, 12, 0.1),
    "vitpose_b": ViTSize(768, 12, 12, 0.3),
    "vitpose_l": ViTSize(1024, 24, 16, 0.5),
    "vitpose_h": ViTSize(1280, 32, 16, 0.55),
}


def vitpose_num_heads(embed_dim: int) -> int:
    """Attention heads of a ViTPose backbone of this width: the size table's, else 64-dim heads."""
    for size in VITPOSE_SIZES.values():
        if size.embed_dim == embed_dim:
            return size.num_heads
    return max(1, embed_dim // 64)


class TopdownHeatmapNet(nn.Module):
    """``img (B,3,H,W)`` normalised crop -> heatmaps ``(B,K,H/4,W/4)`` (``(B,K,64,48)`` at 256x192)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_keypoints(self) -> int:
        return int(self.head.num_keypoints)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W) -> (B,C,h,w)`` backbone feature map (16x12 at 256x192)."""
        return self.backbone(img)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(img))


def _vitpose(
    embed_dim: int,
    depth: int,
    num_heads: int,
    num_keypoints: int,
    drop_path_rate: float,
    img_size: tuple[int, int] = (256, 192),
    deconv_channels: tuple[int, ...] = (256, 256),
    **backbone_kw,
) -> TopdownHeatmapNet:
    backbone = ViTPoseBackbone(
        img_size=img_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
        **backbone_kw,
    )
    head = HeatmapHead(embed_dim, num_keypoints, deconv_channels, (4,) * len(deconv_channels))
    return TopdownHeatmapNet(backbone, head)


def _sized(name: str, num_keypoints: int, drop_path_rate: float | None, **kw) -> TopdownHeatmapNet:
    size = VITPOSE_SIZES[name]
    rate = size.drop_path_rate if drop_path_rate is None else drop_path_rate
    return _vitpose(size.embed_dim, size.depth, size.num_heads, num_keypoints, rate, **kw)


def vitpose_b(num_keypoints: int = 21, drop_path_rate: float | None = None, **kw) -> TopdownHeatmapNet:
    """ViTPose-B (ViT-B/16, 768x12 layers, 12 heads; ~89.99 M params with 17 keypoints; drop path 0.3). Layer decay
    0.75."""
    return _sized("vitpose_b", num_keypoints, drop_path_rate, **kw)


def maskpose_b(num_keypoints: int = 21, drop_path_rate: float | None = None, **kw) -> TopdownHeatmapNet:
    """MaskPose-B: the ViTPose-B network (the mask is applied to the input image)."""
    return vitpose_b(num_keypoints, drop_path_rate, **kw)


def vitpose_s(num_keypoints: int = 21, drop_path_rate: float | None = None, **kw) -> TopdownHeatmapNet:
    """ViTPose-S as in MMPose's config (384 dim, 12 layers, 12 heads of 32; drop path 0.1). Upstream uses layer decay
    0.8."""
    return _sized("vitpose_s", num_keypoints, drop_path_rate, **kw)


def vitpose_l(num_keypoints: int = 21, drop_path_rate: float | None = None, **kw) -> TopdownHeatmapNet:
    """ViTPose-L as in MMPose's config (1024 dim, 24 layers, 16 heads; drop path 0.5). Upstream uses layer decay
    0.8."""
    return _sized("vitpose_l", num_keypoints, drop_path_rate, **kw)


def vitpose_h(num_keypoints: int = 21, drop_path_rate: float | None = None, **kw) -> TopdownHeatmapNet:
    """ViTPose-H as in MMPose's config (1280 dim, 32 layers, 16 heads; drop path 0.55). Upstream uses layer decay
    0.85."""
    return _sized("vitpose_h", num_keypoints, drop_path_rate, **kw)


def vitpose_tiny(
    num_keypoints: int = 21,
    drop_path_rate: float = 0.0,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 2,
    deconv_channels: tuple[int, ...] = (32, 32),
    **kw,
) -> TopdownHeatmapNet:
    """A tiny network of the same code for tests and smoke runs (pass ``img_size=(64, 48)`` for speed)."""
    return _vitpose(embed_dim, depth, num_heads, num_keypoints, drop_path_rate, deconv_channels=deconv_channels, **kw)


POSE_NET_PRESETS: dict[str, Callable[..., TopdownHeatmapNet]] = {
    "vitpose_tiny": vitpose_tiny,
    "vitpose_s": vitpose_s,
    "vitpose_b": vitpose_b,
    "vitpose_l": vitpose_l,
    "vitpose_h": vitpose_h,
    "maskpose_b": maskpose_b,
}


def build_pose_net(preset: str, num_keypoints: int = 21, **kw) -> TopdownHeatmapNet:
    """Build a preset from :data:`POSE_NET_PRESETS`; ``kw`` goes to the preset (``drop_path_rate``, ``img_size``)."""
    try:
        factory = POSE_NET_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown pose-net preset {preset!r}; choose one of {sorted(POSE_NET_PRESETS)}") from None
    return factory(num_keypoints=num_keypoints, **kw)
