"""CSPNeXt backbone (P5) of RTMDet, with the building blocks it shares with the PAFPN neck.

One code path serves every size: channels scale by ``widen_factor`` and block counts by ``deepen_factor``
(L = 1.0 / 1.0, tiny = 0.167 / 0.375). Module names follow MMDetection so checkpoints load unchanged.

References:
    RTMDet: An Empirical Study of Designing Real-Time Object Detectors, Lyu et al., 2022 (arXiv 2212.07784).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.models.components.rtmdet.conv_module import ConvModule, DepthwiseSeparableConvModule

# P5 rows: (in_channels, out_channels, num_blocks, add_identity, use_spp) at widen = deepen = 1.
ARCH_P5: tuple[tuple[int, int, int, bool, bool], ...] = (
    (64, 128, 3, True, False),
    (128, 256, 6, True, False),
    (256, 512, 6, True, False),
    (512, 1024, 3, False, True),
)


class ChannelAttention(nn.Module):
    """Squeeze-excite style gate: ``x * hardsigmoid(fc(avgpool(x)))`` with a biased 1x1 conv ``fc``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape."""
        # Upstream keeps the pooling out of autocast (a mean over many fp16 values loses precision).
        with torch.autocast(device_type=x.device.type, enabled=False):
            pooled = self.global_avgpool(x)
        return x * self.act(self.fc(pooled))


class CSPNeXtBlock(nn.Module):
    """3x3 ConvModule then a 5x5 depthwise-separable ConvModule, with an optional residual."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 1.0, add_identity: bool = True) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvModule(in_channels, hidden, 3)
        self.conv2 = DepthwiseSeparableConvModule(hidden, out_channels, 5)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H, W)``."""
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: ``final_conv(attention(cat[blocks(main_conv(x)), short_conv(x)]))``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        expand_ratio: hidden width of each branch relative to ``out_channels``.
        num_blocks: number of ``CSPNeXtBlock`` on the main branch.
        add_identity: residuals inside the blocks (backbone stages 1-3 only).
        channel_attention: gate the concatenation with ``ChannelAttention`` (backbone only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: float = 0.5,
        num_blocks: int = 1,
        add_identity: bool = True,
        channel_attention: bool = False,
    ) -> None:
        super().__init__()
        mid = int(out_channels * expand_ratio)
        self.main_conv = ConvModule(in_channels, mid, 1)
        self.short_conv = ConvModule(in_channels, mid, 1)
        self.final_conv = ConvModule(2 * mid, out_channels, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, mid, 1.0, add_identity) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H, W)``."""
        out = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1x1 halve, concat with stride-1 max-pools (5, 9, 13), 1x1 back."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        mid = in_channels // 2
        self.kernel_sizes = tuple(kernel_sizes)
        self.conv1 = ConvModule(in_channels, mid, 1)
        self.conv2 = ConvModule(mid * (len(self.kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H, W)``."""
        x = self.conv1(x)
        pools = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.kernel_sizes]
        return self.conv2(torch.cat([x, *pools], dim=1))


class CSPNeXt(nn.Module):
    """CSPNeXt-P5: a 3-conv stem (stride 2) and four stages (stride 2 each), returning C3, C4, C5.

    Args:
        deepen_factor: block-count multiplier (``max(round(n * deepen), 1)``).
        widen_factor: channel multiplier.
        expand_ratio: CSPLayer branch width ratio.
        out_indices: which of (stem, stage1..4) to return; (2, 3, 4) gives strides 8, 16, 32.
        channel_attention: ChannelAttention inside every stage's CSPLayer.
        stage_blocks: explicit block counts of the four stages (overrides ``deepen_factor``).
    """

    def __init__(
        self,
        deepen_factor: float = 1.0,
        widen_factor: float = 1.0,
        expand_ratio: float = 0.5,
        out_indices: Sequence[int] = (2, 3, 4),
        channel_attention: bool = True,
        stage_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if stage_blocks is not None and len(stage_blocks) != len(ARCH_P5):
            raise ValueError(f"stage_blocks needs {len(ARCH_P5)} entries, got {list(stage_blocks)}")
        self.out_indices = tuple(out_indices)
        stem_out = int(ARCH_P5[0][0] * widen_factor)
        stem_mid = int(ARCH_P5[0][0] * widen_factor // 2)
        self.stem = nn.Sequential(
            ConvModule(3, stem_mid, 3, stride=2),
            ConvModule(stem_mid, stem_mid, 3),
            ConvModule(stem_mid, stem_out, 3),
        )
        self.out_channels: list[int] = []
        for i, (cin, cout, n, add_identity, use_spp) in enumerate(ARCH_P5):
            cin, cout = int(cin * widen_factor), int(cout * widen_factor)
            n = int(stage_blocks[i]) if stage_blocks is not None else max(round(n * deepen_factor), 1)
            layers: list[nn.Module] = [ConvModule(cin, cout, 3, stride=2)]
            if use_spp:
                layers.append(SPPBottleneck(cout, cout))
            layers.append(CSPLayer(cout, cout, expand_ratio, n, add_identity, channel_attention))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            if i + 1 in self.out_indices:
                self.out_channels.append(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` -> maps at the ``out_indices`` (default strides 8, 16, 32)."""
        outs = []
        for i, name in enumerate(["stem", "stage1", "stage2", "stage3", "stage4"]):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
