"""MAE ImageNet initialisation of the ViTPose backbone through timm (``vit_base_patch16_224.mae``).

Our backbone uses timm's parameter names, so blocks, patch conv and final norm copy by name. The patch conv weights are
the same (16x16 kernel); only the padding differs, which is a property of the module, not of the weights. The 14x14
position grid (224 px) is resampled to the 16x12 grid like mmpretrain's ``resize_pos_embed``: drop the cls row, bicubic,
``align_corners=False``, no antialiasing (timm's own ``resample_abs_pos_embed`` antialiases by default, which
changes the downsampled width axis).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bmp_lightning.structures.checkpoint import load_state_dict_report

log = logging.getLogger(__name__)

MAE_MODEL = "vit_base_patch16_224.mae"
_SKIPPED = ("cls_token", "reg_token", "mask_token", "fc_norm.", "head.", "norm_pre.")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``(1, P + N, C)`` position embedding -> ``(1, h*w, C)`` for ``new_grid = (h, w)``, prefix (cls) rows dropped.

    The old grid defaults to the square ``sqrt(N) x sqrt(N)``. Tokens are row-major over (rows, cols).
    """
    patches = pos_embed[:, num_prefix_tokens:]
    n, c = patches.shape[1], patches.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} position rows; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold {n} position rows")
    if tuple(old_grid) == tuple(new_grid):
        return patches.clone()
    grid = patches.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)


def mae_to_backbone_state(
    timm_state: Mapping[str, torch.Tensor], grid_size: tuple[int, int], num_prefix_tokens: int = 1
) -> dict[str, torch.Tensor]:
    """A timm ViT state dict -> :class:`~bmp_lightning.models.components.vit.ViTPoseBackbone` state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, value in timm_state.items():
        if key.startswith(_SKIPPED):
            continue
        if key == "pos_embed":
            value = resample_pos_embed(value, grid_size, num_prefix_tokens)
        out[key] = value
    return out


class MAEUnavailableError(RuntimeError):
    """timm's MAE weights cannot be fetched (offline, hub unreachable, not cached)."""


def load_mae_init(backbone: nn.Module, model_name: str = MAE_MODEL, allow_random_init: bool = False) -> bool:
    """Initialise ``backbone`` (a ``ViTPoseBackbone``) from timm's MAE weights.

    The hub download is the only network access. When it fails the run stops (a paper run from random weights
    would be silently meaningless) unless ``allow_random_init`` (``model.allow_random_init=true``): then one warning
    and the random init, and the return value is False.

    Raises:
        MAEUnavailableError: the weights cannot be had and ``allow_random_init`` is False.
    """
    import timm

    try:
        mae = timm.create_model(model_name, pretrained=True)
    except Exception as err:  # offline, hub unreachable, missing cache: all end the same way
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if not allow_random_init:
            raise MAEUnavailableError(
                f"MAE init weights for the ViTPose backbone are unavailable ({model_name}: {reason}). They are "
                f"timm's hub model timm/{model_name} (file model.safetensors); fetch them where there is network "
                f"access with\n    hf download timm/{model_name} model.safetensors\nand copy the Hugging Face cache "
                "($HF_HOME) here, or pass model.allow_random_init=true to train from random weights on purpose"
            ) from None
        log.warning("MAE init weights unavailable: training from RANDOM init (model.allow_random_init=true) "
                    "[%s: %s]", model_name, reason)  # fmt: skip
        return False
    prefix = getattr(mae, "num_prefix_tokens", 1)
    state = mae_to_backbone_state(mae.state_dict(), backbone.grid_size, prefix)
    load_state_dict_report(backbone, state, strict=True, name=f"timm:{model_name}")
    log.info("initialised the backbone from %s (pos-embed resampled to %s)", model_name, backbone.grid_size)
    return True
