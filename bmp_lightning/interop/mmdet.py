"""MMDetection RTMDet-Ins weights <-> :class:`~bmp_lightning.models.components.rtmdet.rtmdet_ins.RTMDetIns`.

Our modules keep MMDetection's names, so the mapping is nearly the identity (MMDetection ``rtmdet_ins_head.py``):

- ``bbox_head.`` -> ``head.``; a ``tood_`` predictor prefix (very early RTMDet files) -> ``rtm_``;
  ``data_preprocessor.*`` and ``bbox_head.rtm_obj.*`` (empty upstream) are skipped.
- Only ``ckpt['state_dict']`` is read: MMEngine's EMA hook swaps the averaged weights into it before saving, so it
  holds the weights to deploy. ``ema_state_dict``, ``meta``, ``optimizer``, ``message_hub`` ... are ignored.
- Head aliasing. In ``RTMDetInsSepBNHead`` ``reg_convs[n]`` *is* ``cls_convs[n]`` and the tower conv of every level
  is the level-0 module, so a checkpoint repeats those tensors under several names. MMEngine loads by walking the
  module tree (cls_convs.0..2, then reg_convs.0..2), the last written alias winning; we resolve the duplicates the
  same way: conv ``i`` <- the last present of ``{cls,reg}_convs.{0,1,2}.i.conv.weight`` (normally
  ``reg_convs.2.i``), BN of level ``n`` <- the last present of ``{cls,reg}_convs.n.i.bn.*``.
- Class count: read from ``rtm_cls`` (80 for the COCO model, 1 for person-only fine-tunes). Asking for fewer classes
  keeps the first ones (``num_classes=1`` on a COCO model keeps *person*); asking for more drops ``rtm_cls``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmp_lightning.structures.checkpoint import extract_state_dict, safe_load

log = logging.getLogger(__name__)


def _load(path: str | Path) -> Any:
    return safe_load(path, placeholders=True)  # weights_only=True, inert placeholders for MMEngine objects


_TOWER = re.compile(r"^head\.(cls|reg)_convs\.(\d+)\.(\d+)\.(conv|bn)\.(.+)$")
_SKIPPED = re.compile(r"^(data_preprocessor\.|head\.rtm_obj\.)")


def _state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``checkpoint['state_dict']`` when present (MMEngine layout), else the mapping itself; tensors only."""
    return extract_state_dict(checkpoint, keys=("state_dict",))


def is_mmdet_rtmdet_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for MMDetection RTMDet(-Ins) weights (``bbox_head.rtm_cls`` / ``bbox_head.tood_cls`` keys)."""
    try:
        sd = _state_dict_of(checkpoint)
    except ValueError:
        return False
    return any(k.startswith(("bbox_head.rtm_cls.", "bbox_head.tood_cls.")) for k in sd)


def mmdet_num_classes(checkpoint: Mapping[str, Any]) -> int:
    """Number of classes of the checkpoint's head (``rtm_cls.0`` output channels)."""
    sd = _state_dict_of(checkpoint)
    for key in ("bbox_head.rtm_cls.0.weight", "bbox_head.tood_cls.0.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    raise ValueError("no bbox_head.rtm_cls.0.weight in the checkpoint: cannot tell the number of classes")


def _rename(key: str) -> str | None:
    if key.startswith("bbox_head."):
        key = "head." + key[len("bbox_head.") :]
    key = re.sub(r"^head\.tood_", "head.rtm_", key)
    return None if _SKIPPED.match(key) else key


def _resolve_towers(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMDetection cls/reg tower keys (already ``head.``-prefixed) -> our ``head.cls_convs.{n}.{i}.*`` keys."""
    levels = sorted({int(_TOWER.match(k).group(2)) for k in tower})
    layers = sorted({int(_TOWER.match(k).group(3)) for k in tower})
    leaves_conv = sorted({_TOWER.match(k).group(5) for k in tower if _TOWER.match(k).group(4) == "conv"})
    leaves_bn = sorted({_TOWER.match(k).group(5) for k in tower if _TOWER.match(k).group(4) == "bn"})
    out: dict[str, torch.Tensor] = {}
    for i in layers:
        for leaf in leaves_conv:
            # MMEngine visits cls_convs.0..L then reg_convs.0..L; the shared conv keeps the last value written.
            order = [f"head.{b}_convs.{n}.{i}.conv.{leaf}" for b in ("cls", "reg") for n in levels]
            present = [k for k in order if k in tower]
            value = tower[present[-1]]
            if any(not torch.equal(tower[k], value) for k in present):
                log.warning("convert_mmdet_rtmdet: tower conv %d differs across aliases; using %s", i, present[-1])
            for n in levels:
                out[f"head.cls_convs.{n}.{i}.conv.{leaf}"] = value
        for n in levels:
            for leaf in leaves_bn:
                present = [k for k in (f"head.{b}_convs.{n}.{i}.bn.{leaf}" for b in ("cls", "reg")) if k in tower]
                if present:
                    out[f"head.cls_convs.{n}.{i}.bn.{leaf}"] = tower[present[-1]]
    return out


def convert_mmdet_rtmdet(
    checkpoint: str | Path | Mapping[str, Any], num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """MMDetection RTMDet-Ins weights (file or loaded dict) -> our ``RTMDetIns`` state dict.

    Args:
        checkpoint: a ``.pth`` path, a loaded checkpoint (``{'state_dict': ..., 'meta': ..., ...}``) or a bare
            MMDetection state dict.
        num_classes: classes wanted; ``None`` keeps the checkpoint's. Fewer keeps the first ``num_classes`` rows of
            ``rtm_cls`` (COCO person is class 0); more drops ``rtm_cls`` so that it is reinitialised.
    """
    if isinstance(checkpoint, (str, Path)):
        # MMEngine files may still carry message_hub objects: placeholders keep them inert (tensors unaffected).
        checkpoint = _load(checkpoint)
    sd = _state_dict_of(checkpoint)
    out: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _rename(key)
        if new is None:
            continue
        if _TOWER.match(new):
            tower[new] = value
        else:
            out[new] = value
    if tower:
        out.update(_resolve_towers(tower))
    cls_keys = sorted(k for k in out if k.startswith("head.rtm_cls."))
    if num_classes is not None and cls_keys:
        have = int(out["head.rtm_cls.0.weight"].shape[0])
        if num_classes < have:
            log.info("convert_mmdet_rtmdet: keeping the first %d of %d classes", num_classes, have)
            for k in cls_keys:
                out[k] = out[k][:num_classes].clone()
        elif num_classes > have:
            log.warning("convert_mmdet_rtmdet: checkpoint has %d classes, %d asked: rtm_cls dropped", have, num_classes)
            for k in cls_keys:
                del out[k]
    return out


def to_mmdet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``RTMDetIns`` state dict -> MMDetection keys, with the ``reg_convs`` aliases MMDetection's model expects."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = "bbox_head." + key[len("head.") :] if key.startswith("head.") else key
        out[new] = value
        m = re.match(r"^bbox_head\.cls_convs\.(.+)$", new)
        if m:
            out[f"bbox_head.reg_convs.{m.group(1)}"] = value
    return out


def load_mmdet_rtmdet(
    model: nn.Module, source: str | Path | Mapping[str, Any], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Convert MMDetection RTMDet-Ins weights (path or loaded dict) and load them into ``model``.

    Returns ``(missing_keys, unexpected_keys)`` (also logged); ``strict=True`` raises on any of them.
    """
    sd = convert_mmdet_rtmdet(source, getattr(model, "num_classes", None))
    missing, unexpected = model.load_state_dict(sd, strict=strict)
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            log.warning("load_mmdet_rtmdet: %d %s keys: %s", len(keys), title, ", ".join(keys))
    return list(missing), list(unexpected)


def rtmdet_state_dict(checkpoint: Mapping[str, Any], num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Our ``RTMDetIns`` state dict from any supported checkpoint layout.

    Accepts a bare state dict with our keys, a Lightning checkpoint (``state_dict`` with a ``model.``-like prefix;
    an EMA copy, i.e. a prefix containing ``ema``, is preferred), or MMDetection weights (detected by their
    ``bbox_head.`` keys, converted by :func:`convert_mmdet_rtmdet`).
    ``num_classes`` smaller than the checkpoint's keeps the first classes (person = 0 on COCO).
    """
    sd = extract_state_dict(checkpoint, keys=("state_dict",))
    anchor = "backbone.stem.0.conv.weight"
    prefixes = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if not prefixes:
        raise ValueError(f"not an RTMDet checkpoint: no '*{anchor}' key among {len(sd)} tensors")
    ema = [p for p in prefixes if "ema" in p.lower()]
    prefix = ema[0] if ema else min(prefixes, key=len)
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if is_mmdet_rtmdet_checkpoint(sd):
        return convert_mmdet_rtmdet(sd, num_classes)
    have = int(sd["head.rtm_cls.0.weight"].shape[0])
    if num_classes is not None and num_classes < have:
        sd = {k: (v[:num_classes] if k.startswith("head.rtm_cls.") else v) for k, v in sd.items()}
    return sd
