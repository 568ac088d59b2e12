"""RTMDet-Ins: CSPNeXt backbone + CSPNeXtPAFPN neck + RTMDetInsSepBNHead, with presets and ``predict``.

Presets follow the MMDetection configs: ``rtmdet_ins_l`` (deepen 1.0, widen 1.0, neck 256, 3 CSP blocks;
57,365,663 parameters with 80 classes) and ``rtmdet_ins_tiny`` (0.167 / 0.375, neck 96, 1 CSP block).
Input: BGR images normalised with BGR mean (103.53, 116.28, 123.675) and std (57.375, 57.12, 58.395);
``bmp_lightning.detector.Detector`` does that from RGB uint8 images.

References:
    RTMDet: An Empirical Study of Designing Real-Time Object Detectors, Lyu et al., 2022 (arXiv 2212.07784).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bmp_lightning.models.components.rtmdet.cspnext import CSPNeXt
from bmp_lightning.models.components.rtmdet.ins_head import RTMDetInsSepBNHead
from bmp_lightning.models.components.rtmdet.pafpn import CSPNeXtPAFPN
from bmp_lightning.models.components.rtmdet.postprocess import postprocess

# name: (deepen_factor, widen_factor, neck/head channels, neck CSP blocks), from the MMDetection configs.
SIZES: dict[str, tuple[float, float, int, int]] = {
    "tiny": (0.167, 0.375, 96, 1),
    "s": (0.33, 0.5, 128, 1),
    "m": (0.67, 0.75, 192, 2),
    "l": (1.0, 1.0, 256, 3),
    "x": (1.33, 1.25, 320, 4),
}


class RTMDetIns(nn.Module):
    """RTMDet instance segmentation network.

    ``forward`` returns raw head outputs (what the training criterion consumes); ``predict`` adds the
    test-time post-processing.
    """

    def __init__(self, backbone: CSPNeXt, neck: CSPNeXtPAFPN, head: RTMDetInsSepBNHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def strides(self) -> tuple[int, ...]:
        return self.head.strides

    def init_weights(self) -> None:
        """Upstream init: Kaiming-uniform (a=sqrt 5, torch's default) convs with zero bias in backbone and neck;
        the head's own init (``RTMDetInsSepBNHead.init_weights``)."""
        for part in (self.backbone, self.neck):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        self.head.init_weights()

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """``(B, 3, H, W)`` normalised BGR -> ``cls_scores`` (per level ``(B, C, H_l, W_l)`` logits),
        ``bbox_preds`` (per level ``(B, 4, H_l, W_l)`` l,t,r,b distances in input pixels), ``kernel_preds``
        (per level ``(B, 169, H_l, W_l)``) and ``mask_feat`` ``(B, 8, H/8, W/8)``."""
        return self.head(self.neck(self.backbone(x)))

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        ori_shapes: Sequence[tuple[int, int]] | None = None,
        scale_factors: Sequence[tuple[float, float]] | None = None,
        score_thr: float = 0.05,
        nms_pre: int = 1000,
        nms_iou: float = 0.6,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect on a normalised batch: the one forward + post-processing of validation (``InstSegLitModule``) and
        inference (``Detector``). Outputs are taken in float32 (a bf16 forward decodes as fp32).

        Args:
            x: ``(B, 3, H, W)`` normalised BGR (H, W multiples of 32).
            ori_shapes: per image original ``(h, w)``; with ``scale_factors`` outputs go back to original pixels.
            scale_factors: per image ``(w_scale, h_scale)`` of the resize original -> input.
            score_thr, nms_pre, nms_iou, max_per_img, mask_thr: test config (MMDetection defaults).

        Returns:
            per image ``bboxes (N, 4)`` xyxy, ``scores (N,)``, ``labels (N,)``, ``masks (N, h, w)`` bool.
        """
        out = {k: ([t.float() for t in v] if isinstance(v, (list, tuple)) else v.float()) for k, v in self(x).items()}
        return postprocess(
            out,
            tuple(x.shape[-2:]),
            ori_shapes,
            scale_factors,
            strides=self.strides,
            mask_stride=self.strides[0],
            score_thr=score_thr,
            nms_pre=nms_pre,
            nms_iou=nms_iou,
            max_per_img=max_per_img,
            mask_thr=mask_thr,
        )


def build_rtmdet_ins(
    num_classes: int = 80,
    deepen_factor: float = 1.0,
    widen_factor: float = 1.0,
    neck_channels: int = 256,
    num_csp_blocks: int = 3,
    stage_blocks: Sequence[int] | None = None,
    channel_attention: bool = True,
) -> RTMDetIns:
    """Build any RTMDet-Ins size from its factors (``stage_blocks`` overrides the deepened block counts)."""
    backbone = CSPNeXt(deepen_factor, widen_factor, channel_attention=channel_attention, stage_blocks=stage_blocks)
    neck = CSPNeXtPAFPN(backbone.out_channels, neck_channels, num_csp_blocks)
    head = RTMDetInsSepBNHead(num_classes, neck_channels, neck_channels)
    model = RTMDetIns(backbone, neck, head)
    model.init_weights()
    return model


def rtmdet_ins(size: str = "l", num_classes: int = 80) -> RTMDetIns:
    """Preset by size name: ``tiny``, ``s``, ``m``, ``l``, ``x``."""
    if size not in SIZES:
        raise ValueError(f"unknown RTMDet-Ins size {size!r}; choose from {sorted(SIZES)}")
    deepen, widen, channels, blocks = SIZES[size]
    return build_rtmdet_ins(num_classes, deepen, widen, channels, blocks)


def rtmdet_ins_l(num_classes: int = 80) -> RTMDetIns:
    """RTMDet-Ins-L (the BBoxMaskPose detector)."""
    return rtmdet_ins("l", num_classes)


def rtmdet_ins_tiny(num_classes: int = 1) -> RTMDetIns:
    """RTMDet-Ins-tiny: the same code path at deepen 0.167 / widen 0.375 (fast tests and smoke runs)."""
    return rtmdet_ins("tiny", num_classes)


def _count(keys: Sequence[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_rtmdet_ins_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Recover ``build_rtmdet_ins`` arguments from a state dict with our keys (any size, any class count)."""
    keys = list(state_dict)
    try:
        stem = state_dict["backbone.stem.2.conv.weight"]
        neck_out = state_dict["neck.out_convs.0.conv.weight"]
        cls = state_dict["head.rtm_cls.0.weight"]
    except KeyError as err:
        raise KeyError(f"not an RTMDet-Ins state dict (missing {err})") from None
    stage_blocks = []
    for i in range(1, 5):
        n = _count(keys, rf"^backbone\.stage{i}\.\d+\.blocks\.(\d+)\.conv1\.conv\.weight$")
        stage_blocks.append(n)
    return {
        "num_classes": int(cls.shape[0]),
        "widen_factor": stem.shape[0] / 64,
        "neck_channels": int(neck_out.shape[0]),
        "num_csp_blocks": _count(keys, r"^neck\.top_down_blocks\.0\.blocks\.(\d+)\.conv1\.conv\.weight$"),
        "stage_blocks": stage_blocks,
        "channel_attention": "backbone.stage1.1.attention.fc.weight" in state_dict,
    }
