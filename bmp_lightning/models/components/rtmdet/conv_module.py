"""Conv-BN-SiLU building blocks of RTMDet (the mmcv ``ConvModule`` layout, so checkpoint keys carry over).

Key names follow mmcv: a ``ConvModule`` holds ``.conv`` (no bias) and ``.bn``; a depthwise-separable
module holds ``.depthwise_conv`` and ``.pointwise_conv``, each a ``ConvModule``.

References:
    RTMDet: An Empirical Study of Designing Real-Time Object Detectors, Lyu et al., 2022 (arXiv 2212.07784).
"""

from __future__ import annotations

import torch
from torch import nn

# The released configs use SyncBN with its defaults (mmcv build_norm_layer), which overrides the
# class-default BN(momentum 0.03, eps 1e-3): eps 1e-5, momentum 0.1 (mmcv SyncBN defaults).
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ConvModule(nn.Module):
    """Conv2d (bias-free) -> BatchNorm2d -> SiLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding; ``None`` gives ``kernel_size // 2``.
        groups: convolution groups (``in_channels`` for a depthwise conv).
        act: apply SiLU after the norm (every RTMDet ConvModule does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H/stride, W/stride)``."""
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ``k x k`` ConvModule followed by a pointwise ``1 x 1`` ConvModule (each with BN + SiLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H/stride, W/stride)``."""
        return self.pointwise_conv(self.depthwise_conv(x))
