"""Classic ViTPose heatmap decoder: transposed-conv upsampling to stride 4, then a 1x1 conv to one map per keypoint.

MMPose 1.x ``HeatmapHead(deconv_out_channels=(256, 256), deconv_kernel_sizes=(4, 4))``
(docs/recipes.md#vitpose-b). Submodule names (``deconv_layers.{0,1,3,4}``, ``final_layer``) are MMPose's,
so weights convert by prefix only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ConvTranspose2d (kernel -> padding, output_padding) that exactly doubles the spatial size.
_DECONV_PADDING = {4: (1, 0), 3: (1, 1), 2: (0, 0)}


class HeatmapHead(nn.Module):
    """``(B, C_in, h, w) -> (B, K, h * 2^n, w * 2^n)`` heatmaps, n = number of deconv layers (2: 16x12 -> 64x48).

    Args:
        in_channels: backbone feature channels (768 for ViT-B).
        num_keypoints: output heatmap channels K.
        deconv_channels: output channels of each ConvTranspose2d(stride 2) + BN + ReLU stage.
        deconv_kernels: kernel size of each stage (4, 3 or 2).
    """

    def __init__(
        self,
        in_channels: int = 768,
        num_keypoints: int = 17,
        deconv_channels: Sequence[int] = (256, 256),
        deconv_kernels: Sequence[int] = (4, 4),
    ) -> None:
        super().__init__()
        if len(deconv_channels) != len(deconv_kernels):
            raise ValueError(f"deconv_channels {deconv_channels} and deconv_kernels {deconv_kernels} differ in length")
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        layers: list[nn.Module] = []
        channels = in_channels
        for out_ch, kernel in zip(deconv_channels, deconv_kernels):
            if kernel not in _DECONV_PADDING:
                raise ValueError(f"unsupported deconv kernel size {kernel}; use one of {sorted(_DECONV_PADDING)}")
            padding, output_padding = _DECONV_PADDING[kernel]
            layers += [
                nn.ConvTranspose2d(channels, out_ch, kernel, 2, padding, output_padding, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            channels = out_ch
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self.init_weights()

    def init_weights(self) -> None:
        """MMPose init: Normal(std 0.001) for (transposed) convs with zero bias, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers(x))
