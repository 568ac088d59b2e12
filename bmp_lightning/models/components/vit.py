"""ViTPose backbone: a plain ViT built from timm's transformer blocks, returning a single stride-16 feature map.

Matches MMPose 1.x ``mmpretrain.VisionTransformer(with_cls_token=False, out_type='featmap', patch_cfg=dict(padding=2))``
(docs/recipes.md#vitpose-b): the patch conv is padded by 2 px, there is no cls token, 192 learned
position embeddings for the 16x12 grid, pre-norm blocks with LayerNorm eps 1e-6 and exact GELU, stochastic depth
increasing linearly from 0 to ``drop_path_rate``, and one final LayerNorm. Parameter names follow timm
(``patch_embed.proj``, ``pos_embed``, ``blocks.{i}``, ``norm``) so an MAE init from timm loads by name
(:mod:`bmp_lightning.interop.timm_init`); MMPose names are mapped by :mod:`bmp_lightning.interop.mmpose`.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


def patch_grid(img_size: tuple[int, int], patch_size: int, padding: int) -> tuple[int, int]:
    """Token grid ``(rows, cols)`` of a ``Conv2d(k=patch_size, s=patch_size, padding=padding)`` on ``img_size``."""
    return tuple((s + 2 * padding - patch_size) // patch_size + 1 for s in img_size)  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection with zero padding: ``(B,3,H,W) -> (B, h*w, C)`` tokens, row-major.

    timm's ``PatchEmbed`` has no padding argument; the 2-px padding shifts the patch grid, so it matters numerically.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, padding: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, h, w)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class ViTPoseBackbone(nn.Module):
    """Plain ViT for top-down pose: ``(B,3,H,W) -> (B, C, h, w)`` on the padded patch grid (16x12 at 256x192).

    Args:
        img_size: input ``(H, W)``; fixes the position-embedding grid.
        patch_size: patch (and stride) size.
        patch_padding: zero padding of the patch conv (2 in ViTPose).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        drop_path_rate: stochastic depth of the last block; block i gets ``rate * i / (depth - 1)``.
        drop_rate: dropout after adding position embeddings (0 in ViTPose).
        attn_drop_rate: attention dropout (0 in ViTPose).
        norm_eps: LayerNorm epsilon (1e-6 as in mmpretrain/timm; HF's 1e-12 default is not used).
    """

    def __init__(
        self,
        img_size: tuple[int, int] = (256, 192),
        patch_size: int = 16,
        patch_padding: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.embed_dim = embed_dim
        self.depth = depth
        self.grid_size = patch_grid(self.img_size, patch_size, patch_padding)
        num_patches = self.grid_size[0] * self.grid_size[1]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_padding)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # np.linspace(0, rate, depth) in mmpretrain: the first block never drops, the last drops with `rate`.
        dpr = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 1 else [0.0]
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=nn.GELU,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Random init (timm style); real runs overwrite it with MAE or ViTPose weights."""
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_vit_module)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B,3,H,W)`` normalised crop -> feature map ``(B, C, h, w)`` after the final LayerNorm."""
        tokens, (h, w) = self.patch_embed(x)
        if (h, w) != self.grid_size:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} gives a {h}x{w} token grid, but the position embeddings are for "
                f"{self.grid_size[0]}x{self.grid_size[1]} (img_size={self.img_size})"
            )
        tokens = self.pos_drop(tokens + self.pos_embed)
        tokens = self.norm(self.blocks(tokens))
        # tokens are row-major over (h, w): back to NCHW.
        return tokens.reshape(x.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()


def _init_vit_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
