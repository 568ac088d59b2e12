"""MMPose ViTPose / MaskPose weights <-> :class:`~bmp_lightning.models.components.pose_net.TopdownHeatmapNet`.

Key names: MMPose 1.x (mmpretrain ``VisionTransformer`` + ``HeatmapHead``), ours (timm's), the original ViTPose repo.
Rules that matter numerically:
- MMPose ``pos_embed`` of length 193 (mmcls-era checkpoints: a cls slot that the forward discarded) loses row 0;
  length 192 (mmpretrain >= 1.0) is used as is; ``cls_token`` is dropped.
- Original-ViTPose checkpoints (``keypoint_head.*``, ``backbone.last_norm``) add the cls-slot embedding to every patch
  in their forward, so that row is folded in: ``pos[:, 1:] + pos[:, :1]``.
- The fused qkv layout is identical everywhere and copies as is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bmp_lightning.structures.checkpoint import LoadReport, extract_state_dict, load_state_dict_report, safe_load

log = logging.getLogger(__name__)

NUM_PATCHES_256x192 = 192  # 16x12 tokens of the padded patch conv

# (MMPose 1.x regex, our replacement); applied in order, first match wins.
_MMPOSE_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^backbone\.patch_embed\.projection\.", "backbone.patch_embed.proj."),
    (r"^backbone\.layers\.(\d+)\.ln1\.", r"backbone.blocks.\1.norm1."),
    (r"^backbone\.layers\.(\d+)\.ln2\.", r"backbone.blocks.\1.norm2."),
    (r"^backbone\.layers\.(\d+)\.attn\.(qkv|proj)\.", r"backbone.blocks.\1.attn.\2."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.blocks.\1.mlp.fc1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"backbone.blocks.\1.mlp.fc2."),
    (r"^backbone\.ln1\.", "backbone.norm."),
    (r"^backbone\.pos_embed$", "backbone.pos_embed"),
    (r"^head\.(deconv_layers\.\d+|final_layer)\.", r"head.\1."),
)
_OURS_TO_MMPOSE: tuple[tuple[str, str], ...] = (
    (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^backbone\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"^backbone\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"^backbone\.blocks\.(\d+)\.attn\.(qkv|proj)\.", r"backbone.layers.\1.attn.\2."),
    (r"^backbone\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"^backbone\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"^backbone\.norm\.", "backbone.ln1."),
    (r"^backbone\.pos_embed$", "backbone.pos_embed"),
    (r"^head\.(deconv_layers\.\d+|final_layer)\.", r"head.\1."),
)
# Original ViTPose repo (ViTAE-Transformer/ViTPose) -> ours.
_ORIGINAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^backbone\.last_norm\.", "backbone.norm."),
    (r"^keypoint_head\.", "head."),
    (
        r"^backbone\.(patch_embed\.proj|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.",
        r"backbone.\1.",
    ),
    (r"^backbone\.pos_embed$", "backbone.pos_embed"),
)
_OURS_IDENTITY: tuple[tuple[str, str], ...] = (
    (r"^(backbone\.(patch_embed\.proj|blocks\.\d+|norm)|head\.(deconv_layers\.\d+|final_layer))\.", r"\1."),
    (r"^backbone\.pos_embed$", "backbone.pos_embed"),
)
_DROPPED = re.compile(r"^(backbone\.cls_token|data_preprocessor\..*)$")


def _unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Accept ``{'state_dict': ...}`` (MMEngine), ``{'model': ...}`` or a bare dict; strip a DDP ``module.`` prefix."""
    sd = extract_state_dict(checkpoint)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def is_mmpose_checkpoint(checkpoint: Mapping) -> bool:
    """True for MMPose 1.x ViTPose-style keys (``backbone.layers.*``, ``backbone.patch_embed.projection.*``)."""
    try:
        sd = _unwrap(checkpoint)
    except ValueError:
        return False
    return any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.")) for k in sd)


def is_original_vitpose_checkpoint(checkpoint: Mapping) -> bool:
    """True for checkpoints of the original ViTPose repo (``keypoint_head.*`` / ``backbone.last_norm.*``)."""
    try:
        sd = _unwrap(checkpoint)
    except ValueError:
        return False
    return any(k.startswith(("keypoint_head.", "backbone.last_norm.")) for k in sd)


def mmpose_num_keypoints(checkpoint: Mapping) -> int:
    """Number of heatmap channels (17 for COCO ViTPose, 21 for the BMP MaskPose/ViTPose weights)."""
    sd = _unwrap(checkpoint)
    for key in ("head.final_layer.weight", "keypoint_head.final_layer.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    raise ValueError("no head.final_layer.weight in the checkpoint: cannot tell the number of keypoints")


def _patch_pos_embed(pos: torch.Tensor, num_patches: int, fold_cls: bool) -> torch.Tensor:
    """``(1, L, C)`` with L = num_patches or num_patches + 1 (leading cls slot) -> ``(1, num_patches, C)``."""
    length = pos.shape[1]
    if length == num_patches:
        return pos
    if length == num_patches + 1:
        return pos[:, 1:] + pos[:, :1] if fold_cls else pos[:, 1:]
    raise ValueError(f"backbone.pos_embed has {length} rows; expected {num_patches} or {num_patches + 1} (cls slot)")


def convert_mmpose_vitpose(checkpoint: Mapping, num_patches: int = NUM_PATCHES_256x192) -> dict[str, torch.Tensor]:
    """MMPose 1.x (or original-ViTPose) ViTPose/MaskPose weights -> our ``TopdownHeatmapNet`` state dict.

    Args:
        checkpoint: a loaded ``.pth`` (``{'state_dict': ..., 'meta': ...}``) or a bare state dict.
        num_patches: token count of the target model (192 = 16x12 for 256x192 crops).

    A state dict already in our names is returned unchanged. Keys that match no rule are kept as is (and logged), so
    that :func:`~bmp_lightning.structures.checkpoint.load_state_dict_report` reports them as unexpected.
    """
    sd = _unwrap(checkpoint)
    original = is_original_vitpose_checkpoint(sd)
    rules = _ORIGINAL_TO_OURS if original else _MMPOSE_TO_OURS
    if not original and not is_mmpose_checkpoint(sd) and any(k.startswith("backbone.blocks.") for k in sd):
        rules = _OURS_IDENTITY  # already in our names: converting again is a no-op
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        new = _rename(key, rules)
        if new is None:
            unknown.append(key)
            new = key
        if new == "backbone.pos_embed":
            value = _patch_pos_embed(value, num_patches, fold_cls=original)
        out[new] = value
    if unknown:
        log.warning("convert_mmpose_vitpose: %d keys match no rule and are kept as is: %s", len(unknown), unknown)
    return out


def to_mmpose(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``TopdownHeatmapNet`` state dict -> MMPose 1.x / mmpretrain >= 1.0 keys (``pos_embed`` 192 rows, no cls)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, _OURS_TO_MMPOSE)
        if new is None:
            raise ValueError(f"to_mmpose: no MMPose name for {key!r}")
        out[new] = value
    return out


def load_mmpose_vitpose(model: nn.Module, source: str | Path | Mapping, strict: bool = True) -> LoadReport:
    """Convert MMPose ViTPose/MaskPose weights (a file path or a loaded dict) and load them into ``model``."""
    name = str(source) if isinstance(source, (str, Path)) else "mmpose state dict"
    ckpt = safe_load(source) if isinstance(source, (str, Path)) else source
    num_patches = getattr(getattr(model, "backbone", None), "pos_embed", torch.empty(1, NUM_PATCHES_256x192)).shape[1]
    return load_state_dict_report(model, convert_mmpose_vitpose(ckpt, num_patches), strict=strict, name=name)
