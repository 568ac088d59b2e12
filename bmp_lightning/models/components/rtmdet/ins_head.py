"""RTMDetInsSepBNHead: RTMDet-Ins dense head (classification, box distances, dynamic mask kernels).

Per level: a 2-conv tower shared by classification and regression, a separate 2-conv kernel tower, and
1x1 predictors ``rtm_cls``, ``rtm_reg``, ``rtm_kernel``. Two upstream quirks are reproduced on purpose
(the released weights depend on them):

* ``share_conv``: the tower convs of levels 1 and 2 are the level-0 modules; only the BNs are per level.
* The regression tower *is* the classification tower (MMDetection appends the cls ModuleList to
  ``reg_convs``; the separately built reg convs are discarded). Here ``reg_convs`` is an alias property,
  not a registered submodule, so its duplicate keys do not appear in ``state_dict``.

The kernel towers are independent per level (not shared). ``mask_head`` is the MaskFeatModule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.models.components.rtmdet.conv_module import ConvModule
from bmp_lightning.models.components.rtmdet.dynamic_mask import num_dynamic_params
from bmp_lightning.models.components.rtmdet.mask_feat import MaskFeatModule


class RTMDetInsSepBNHead(nn.Module):
    """RTMDet-Ins head with shared convs and separate BNs per level.

    Args:
        num_classes: foreground classes (80 for COCO, 1 for person-only).
        in_channels: channels of the neck maps.
        feat_channels: tower width.
        stacked_convs: convs per tower.
        strides: strides of the levels (input pixels).
        num_prototypes: mask prototypes.
        dyconv_channels: hidden width of the dynamic mask convs.
        num_dyconvs: number of dynamic mask convs.
        share_conv: share tower conv weights across levels.
        pred_kernel_size: kernel size of the predictors.
    """

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 2,
        strides: Sequence[int] = (8, 16, 32),
        num_prototypes: int = 8,
        dyconv_channels: int = 8,
        num_dyconvs: int = 3,
        share_conv: bool = True,
        pred_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.num_prototypes = num_prototypes
        self.dyconv_channels = dyconv_channels
        self.num_gen_params = num_dynamic_params(num_prototypes, dyconv_channels, num_dyconvs)
        pad = pred_kernel_size // 2

        def tower() -> nn.ModuleList:
            return nn.ModuleList(
                [ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(stacked_convs)]
            )

        self.cls_convs = nn.ModuleList([tower() for _ in self.strides])
        self.kernel_convs = nn.ModuleList([tower() for _ in self.strides])
        self.rtm_cls = nn.ModuleList(
            [nn.Conv2d(feat_channels, num_classes, pred_kernel_size, padding=pad) for _ in self.strides]
        )
        self.rtm_reg = nn.ModuleList([nn.Conv2d(feat_channels, 4, pred_kernel_size, padding=pad) for _ in self.strides])
        self.rtm_kernel = nn.ModuleList(
            [nn.Conv2d(feat_channels, self.num_gen_params, pred_kernel_size, padding=pad) for _ in self.strides]
        )
        if share_conv:
            for level in self.cls_convs[1:]:
                for i, layer in enumerate(level):
                    layer.conv = self.cls_convs[0][i].conv
        self.mask_head = MaskFeatModule(in_channels, feat_channels, 4, len(self.strides), num_prototypes)
        self.init_weights()

    @property
    def reg_convs(self) -> nn.ModuleList:
        """The regression tower: the classification tower itself (upstream quirk, see the module docstring)."""
        return self.cls_convs

    def init_weights(self, prior_prob: float = 0.01) -> None:
        """Upstream init: every conv N(0, 0.01) with zero bias, BN 1/0, cls bias for ``prior_prob``, reg bias 1."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        bias_cls = -math.log((1 - prior_prob) / prior_prob)
        for cls, reg in zip(self.rtm_cls, self.rtm_reg):
            nn.init.constant_(cls.bias, bias_cls)
            nn.init.constant_(reg.bias, 1.0)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Neck maps -> raw head outputs.

        Returns:
            ``cls_scores``: per level ``(B, C, H, W)`` logits; ``bbox_preds``: per level ``(B, 4, H, W)``
            ``ReLU(rtm_reg) * stride``, the (l, t, r, b) distances in input pixels; ``kernel_preds``: per level
            ``(B, 169, H, W)``; ``mask_feat``: ``(B, 8, H/8, W/8)`` prototypes.
        """
        if len(feats) != len(self.strides):
            raise ValueError(f"head expects {len(self.strides)} levels, got {len(feats)}")
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for idx, (x, stride) in enumerate(zip(feats, self.strides)):
            t = x
            for layer in self.cls_convs[idx]:
                t = layer(t)
            k = x
            for layer in self.kernel_convs[idx]:
                k = layer(k)
            cls_scores.append(self.rtm_cls[idx](t))
            # The shared tower output also feeds the regressor (reg_convs is cls_convs).
            bbox_preds.append(F.relu(self.rtm_reg[idx](t)) * stride)
            kernel_preds.append(self.rtm_kernel[idx](k))
        return {
            "cls_scores": cls_scores,
            "bbox_preds": bbox_preds,
            "kernel_preds": kernel_preds,
            "mask_feat": mask_feat,
        }
