"""Pose weights in any of the forms a user has: our Lightning ``.ckpt``, an exported state dict, an official MMPose
``.pth`` (ViTPose-B multi, MaskPose-B), an original-ViTPose checkpoint, or ``mae`` (timm's MAE ImageNet init)."""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import torch
from torch import nn

from bmp_lightning.interop.hub import resolve_weights
from bmp_lightning.interop.mmpose import convert_mmpose_vitpose
from bmp_lightning.interop.timm_init import load_mae_init
from bmp_lightning.models.components import pose_net
from bmp_lightning.structures.checkpoint import extract_state_dict, load_state_dict_report, safe_load
from bmp_lightning.structures.files import atomic_torch_save

log = logging.getLogger(__name__)


def read_pose_weights(
    path: str | os.PathLike, allow_objects: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a weights file (never unpickling code) -> (state dict in our ``TopdownHeatmapNet`` names, meta).

    ``allow_objects``: keep Python objects the file pickles besides tensors and plain data (MMEngine's message hub)
    as inert placeholders; False refuses such a file (``UnsafeCheckpointError`` naming the file and the globals).

    ``meta`` carries what the file knows about the model: ``use_mask``, ``net_config`` (the Hydra config of the
    network for our checkpoints) and ``source`` (``lightning`` / ``ours`` / ``mmpose``).
    """
    obj = safe_load(path, placeholders=allow_objects)
    meta: dict[str, Any] = {}
    if (
        isinstance(obj, dict)
        and "pytorch-lightning_version" in obj
        or (isinstance(obj, dict) and any(str(k).startswith("net.") for k in obj.get("state_dict", {})))
    ):
        hp = obj.get("hyper_parameters", {}) or {}
        meta.update(source="lightning", use_mask=hp.get("use_mask"), net_config=obj.get("net_config"))
        sd = extract_state_dict(obj, keys=("state_dict",), prefix="net.")
        return sd, meta
    if isinstance(obj, dict) and "net_config" in obj and "state_dict" in obj:  # our export
        meta.update(source="ours", use_mask=obj.get("use_mask"), net_config=obj["net_config"])
        return dict(obj["state_dict"]), meta
    meta["source"] = "mmpose"
    return convert_mmpose_vitpose(obj), meta


def load_pose_weights(
    net: nn.Module, path: str | os.PathLike, strict: bool = False, allow_random_init: bool = False
) -> None:
    """Initialise ``net`` from a weights file, a name (``vitpose-b-multi``, ``maskpose-b``: fetched from the hub and
    cached), or ``mae`` for timm's MAE ImageNet backbone.

    Non-strict by default so a 17-keypoint head can initialise a 21-keypoint model: every missing, unexpected or
    mismatched key is reported. ``allow_random_init``: MAE weights that cannot be fetched leave the random init
    (with a warning) instead of stopping.
    """
    if str(path).lower() == "mae":
        load_mae_init(net.backbone, allow_random_init=allow_random_init)
        return

    path = resolve_weights(path, key="model.init_weights", kind="pose")
    sd, _ = read_pose_weights(path)
    report = load_state_dict_report(net, sd, strict=strict, name=str(path))
    log.info("initialised pose network from %s (%s)", path, "all keys matched" if report.ok else "see report above")


def infer_net_kwargs(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture off the weights: width, depth, heads (64-dim heads), deconv widths, keypoints, grid."""
    pos = sd["backbone.pos_embed"]
    embed_dim = int(pos.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    deconv = []
    for i in (0, 3, 6):
        w = sd.get(f"head.deconv_layers.{i}.weight")
        if w is not None:
            deconv.append(int(w.shape[1]))
    num_keypoints = int(sd["head.final_layer.weight"].shape[0])
    tokens = int(pos.shape[1])
    grid_w = round(math.sqrt(tokens * 3 / 4))  # 4:3 portrait crops: 16x12 tokens for 256x192
    grid_h = tokens // grid_w
    img_size = ((grid_h - 1) * 16 + 16 - 4, (grid_w - 1) * 16 + 16 - 4)  # inverse of the padded patch grid
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=pose_net.vitpose_num_heads(embed_dim),  # not stored in the weights (qkv is fused)
        deconv_channels=tuple(deconv),
        num_keypoints=num_keypoints,
        img_size=img_size,
    )


def build_net_from_weights(
    path: str | os.PathLike, preset: str | None = None, allow_objects: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the right network for a weights file and load it strictly (a file pickling arbitrary Python objects
    is refused unless ``allow_objects``, see :func:`read_pose_weights`)."""
    import hydra

    sd, meta = read_pose_weights(path, allow_objects=allow_objects)
    if preset is not None:
        net = pose_net.build_pose_net(preset, num_keypoints=int(sd["head.final_layer.weight"].shape[0]))
    elif meta.get("net_config"):
        net = hydra.utils.instantiate(meta["net_config"])
    else:
        kw = infer_net_kwargs(sd)
        net = pose_net._vitpose(
            kw["embed_dim"], kw["depth"], kw["num_heads"], kw["num_keypoints"], 0.0,
            img_size=kw["img_size"], deconv_channels=kw["deconv_channels"],
        )  # fmt: skip
    load_state_dict_report(net, sd, strict=True, name=str(path))
    return net, meta


def export_pose_weights(net: nn.Module, path: str | os.PathLike, net_config: dict | None, use_mask: bool) -> None:
    """Write a plain weights file (tensors + json-like meta only, loadable with ``weights_only=True``)."""

    atomic_torch_save({"state_dict": net.state_dict(), "net_config": net_config, "use_mask": bool(use_mask)}, path)
