"""Meta's SAM 2 / 2.1 checkpoints (``sam2.1_hiera_{tiny,small,base_plus,large}.pt``) on transformers' ``Sam2Model``.

BBoxMaskPose runs Meta's ``sam2`` code on Meta's ``.pt`` files (``{"model": state_dict}``). Only the image path
of those files is used here (image encoder, prompt encoder, mask decoder, ``no_mem_embed``); the video memory
modules are dropped. The size is read off the weights: the patch embedding width and the stage lengths (a block
whose width changes has a ``proj`` layer) pick one of Meta's four Hiera configurations, whose remaining
hyper-parameters (heads, global-attention blocks, window sizes) are not stored in the weights.

The key mapping follows the names of both implementations (transformers' SAM 2 conversion script does the same
renames): ``image_encoder.trunk`` -> ``vision_encoder.backbone``, ``norm{i}`` -> ``layer_norm{i}``, every
``MLP.layers.{0..n-1}`` -> ``proj_in``, ``layers.{0..n-3}``, ``proj_out``, the four ``point_embeddings`` stacked
into one ``point_embed`` table, ``mask_downscaling`` / ``output_upscaling`` Sequential indices to named layers,
``out_proj`` -> ``o_proj``, and the random-Fourier matrix copied to ``shared_image_embedding``. No tensor is
reshaped or transposed; a loaded file must fill every parameter of the model (strict).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from bmp_lightning.structures.checkpoint import extract_state_dict, safe_load

# Meta's configs sam2.1_hiera_{t,s,b+,l}.yaml (sam2 1.1.0); heads double at every stage (head_mul 2).
HIERA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=96, blocks_per_stage=[1, 2, 7, 2], num_attention_heads=1,
                 global_attention_blocks=[5, 7, 9], window_size_per_stage=[8, 4, 14, 7],
                 window_positional_embedding_background_size=[7, 7]),
    "small": dict(hidden_size=96, blocks_per_stage=[1, 2, 11, 2], num_attention_heads=1,
                  global_attention_blocks=[7, 10, 13], window_size_per_stage=[8, 4, 14, 7],
                  window_positional_embedding_background_size=[7, 7]),
    "base_plus": dict(hidden_size=112, blocks_per_stage=[2, 3, 16, 3], num_attention_heads=2,
                      global_attention_blocks=[12, 16, 20], window_size_per_stage=[8, 4, 14, 7],
                      window_positional_embedding_background_size=[14, 14]),
    "large": dict(hidden_size=144, blocks_per_stage=[2, 6, 36, 4], num_attention_heads=2,
                  global_attention_blocks=[23, 33, 43], window_size_per_stage=[8, 4, 16, 8],
                  window_positional_embedding_background_size=[7, 7]),
}  # fmt: skip

_KEEP = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
_TRUNK = "image_encoder.trunk."


def is_meta_sam2_state(sd: Mapping[str, Any]) -> bool:
    return f"{_TRUNK}patch_embed.proj.weight" in sd and "sam_mask_decoder.iou_token.weight" in sd


def meta_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict of a loaded Meta checkpoint (``{"model": sd}``) or of a bare state dict."""
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not is_meta_sam2_state(sd):
        raise ValueError("not a Meta SAM 2 checkpoint: expected {'model': state_dict} with image_encoder.trunk.* keys")
    return extract_state_dict(sd, keys=())


def infer_hiera_size(sd: Mapping[str, torch.Tensor]) -> str:
    """``tiny`` | ``small`` | ``base_plus`` | ``large`` from the patch width and the stage lengths."""
    width = int(sd[f"{_TRUNK}patch_embed.proj.weight"].shape[0])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(_TRUNK)}blocks\.(\d+)\.", k))})
    starts = [i for i in blocks if f"{_TRUNK}blocks.{i}.proj.weight" in sd]  # first block of stages 2..4
    bounds = [0, *starts, len(blocks)]
    stages = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for name, p in HIERA_PRESETS.items():
        if p["hidden_size"] == width and p["blocks_per_stage"] == stages:
            return name
    known = {n: (p["hidden_size"], p["blocks_per_stage"]) for n, p in HIERA_PRESETS.items()}
    raise ValueError(f"SAM 2 Hiera of width {width} with stages {stages} matches none of Meta's sizes {known}")


def sam2_config(size: str, image_size: int = 1024) -> Any:
    """transformers ``Sam2Config`` of one of Meta's Hiera sizes."""
    from transformers import Sam2Config

    p = HIERA_PRESETS[size]
    d, h = p["hidden_size"], p["num_attention_heads"]
    backbone = dict(
        model_type="sam2_hiera_det_model",
        image_size=[image_size, image_size],
        embed_dim_per_stage=[d, 2 * d, 4 * d, 8 * d],
        num_attention_heads_per_stage=[h, 2 * h, 4 * h, 8 * h],
        **p,
    )
    s = image_size // 4
    vision = dict(
        model_type="sam2_vision_model",
        backbone_config=backbone,
        backbone_channel_list=[8 * d, 4 * d, 2 * d, d],
        backbone_feature_sizes=[[s, s], [s // 2, s // 2], [s // 4, s // 4]],
    )
    return Sam2Config(vision_config=vision, prompt_encoder_config={"image_size": image_size})


def _mlp_layers(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Layer count of every Meta ``MLP`` (``<prefix>.layers.<i>.weight``), by prefix."""
    count: dict[str, int] = {}
    for k in sd:
        m = re.match(r"(.*)\.layers\.(\d+)\.weight$", k)
        if m and (m.group(1).endswith("mlp") or "hypernetworks_mlps" in m.group(1) or m.group(1).endswith("_head")):
            count[m.group(1)] = max(count.get(m.group(1), 0), int(m.group(2)) + 1)
    return count


_RENAMES = (
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.shared_embedding.positional_embedding"),
    (r"^sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.norm(\d)\.", r".layer_norm\1."),
)  # fmt: skip


def convert_meta_sam2(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta SAM 2 state dict -> transformers ``Sam2Model`` state dict (image path only)."""
    mlps = _mlp_layers(sd)
    out: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(_KEEP):
            continue
        m = re.match(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$", key)
        if m:
            points[int(m.group(1))] = value
            continue
        m = re.match(r"(.*)\.layers\.(\d+)\.(weight|bias)$", key)
        if m and m.group(1) in mlps:  # MLP: first -> proj_in, last -> proj_out, middle i -> layers.(i-1)
            n, i = mlps[m.group(1)], int(m.group(2))
            part = "proj_in" if i == 0 else "proj_out" if i == n - 1 else f"layers.{i - 1}"
            key = f"{m.group(1)}.{part}.{m.group(3)}"
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def load_meta_sam2(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Any:
    """A transformers ``Sam2Model`` holding the weights of a Meta ``sam2.1_hiera_*.pt`` file (strict load)."""
    from transformers import Sam2Model

    sd = meta_state_dict(safe_load(path))
    size = infer_hiera_size(sd)
    model = Sam2Model(sam2_config(size))
    hf_sd = convert_meta_sam2(sd)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: Meta SAM 2 ({size}) weights do not fill transformers' Sam2Model: missing {sorted(missing)[:8]}"
            f" ({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
