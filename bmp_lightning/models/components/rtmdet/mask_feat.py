"""MaskFeatModule of RTMDet-Ins: mask prototypes at stride 8 from all three neck levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.models.components.rtmdet.conv_module import ConvModule


class MaskFeatModule(nn.Module):
    """Resize P4, P5 (bilinear) to P3, concat, 1x1 fuse (no norm/act), 4 ConvModules, 1x1 to prototypes.

    Args:
        in_channels: channels of each neck level.
        feat_channels: hidden channels.
        stacked_convs: number of 3x3 ConvModules.
        num_levels: neck levels fused.
        num_prototypes: output channels (prototypes).
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_levels: int = 3,
        num_prototypes: int = 8,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.fusion_conv = nn.Conv2d(num_levels * in_channels, in_channels, 1)
        self.stacked_convs = nn.Sequential(
            *[ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(stacked_convs)]
        )
        self.projection = nn.Conv2d(feat_channels, num_prototypes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Neck maps (P3, P4, P5) -> ``(B, num_prototypes, H3, W3)``."""
        size = feats[0].shape[-2:]
        fused = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1 : self.num_levels]
        ]
        x = self.fusion_conv(torch.cat(fused, dim=1))
        return self.projection(self.stacked_convs(x))
