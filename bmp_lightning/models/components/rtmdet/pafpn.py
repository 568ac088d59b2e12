"""CSPNeXtPAFPN: the path-aggregation neck of RTMDet (top-down then bottom-up CSPLayers, 3x3 output convs).

References:
    RTMDet: An Empirical Study of Designing Real-Time Object Detectors, Lyu et al., 2022 (arXiv 2212.07784).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.models.components.rtmdet.conv_module import ConvModule
from bmp_lightning.models.components.rtmdet.cspnext import CSPLayer


class CSPNeXtPAFPN(nn.Module):
    """Fuse C3, C4, C5 into three maps of ``out_channels`` at strides 8, 16, 32.

    Neck CSPLayers have no residuals and no channel attention; upsampling is nearest x2.

    Args:
        in_channels: channels of (C3, C4, C5), e.g. (256, 512, 1024) for L.
        out_channels: channels of every output map.
        num_csp_blocks: blocks per CSPLayer (3 for L, 1 for tiny).
        expand_ratio: CSPLayer branch width ratio.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024),
        out_channels: int = 256,
        num_csp_blocks: int = 3,
        expand_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        c = list(in_channels)
        n = len(c)
        self.in_channels = c
        self.out_channels = out_channels

        def csp(cin: int, cout: int) -> CSPLayer:
            return CSPLayer(cin, cout, expand_ratio, num_csp_blocks, add_identity=False, channel_attention=False)

        # Index k of the top-down lists works on level n-1-k (deepest first).
        self.reduce_layers = nn.ModuleList([ConvModule(c[i], c[i - 1], 1) for i in range(n - 1, 0, -1)])
        self.top_down_blocks = nn.ModuleList([csp(2 * c[i - 1], c[i - 1]) for i in range(n - 1, 0, -1)])
        self.downsamples = nn.ModuleList([ConvModule(c[i], c[i], 3, stride=2) for i in range(n - 1)])
        self.bottom_up_blocks = nn.ModuleList([csp(2 * c[i], c[i + 1]) for i in range(n - 1)])
        self.out_convs = nn.ModuleList([ConvModule(c[i], out_channels, 3) for i in range(n)])

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(C3, C4, C5) -> (P3, P4, P5), each ``(B, out_channels, H_l, W_l)``."""
        n = len(self.in_channels)
        if len(feats) != n:
            raise ValueError(f"CSPNeXtPAFPN expects {n} feature maps, got {len(feats)}")
        # Top-down: the reduced deeper map is kept (it is reused by the bottom-up path).
        inner = [feats[-1]]
        for k, idx in enumerate(range(n - 1, 0, -1)):
            high = self.reduce_layers[k](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.top_down_blocks[k](torch.cat([up, feats[idx - 1]], dim=1)))
        # Bottom-up.
        outs = [inner[0]]
        for k in range(n - 1):
            down = self.downsamples[k](outs[-1])
            outs.append(self.bottom_up_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return tuple(conv(o) for conv, o in zip(self.out_convs, outs))
