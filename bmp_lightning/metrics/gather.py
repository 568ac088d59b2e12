"""DDP-safe collection of per-rank predictions.

Distributed samplers pad the last batch by repeating samples, so a gathered list holds some predictions twice;
``deduplicate`` drops the repeats by a key (``instance_id`` for pose, ``image_id`` for detection).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    import torch.distributed as dist  # lazily: the scoring CLI should not pay for importing torch

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_predictions(local: Iterable[Any]) -> list[Any]:
    """All ranks' predictions concatenated in rank order (``all_gather_object``); the local list otherwise.

    A collective call: under DDP every rank must call it. Items must be picklable (numpy arrays, RLE dicts ...).
    """
    local = list(local)
    if not is_distributed():
        return local
    import torch.distributed as dist

    parts: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in (part or [])]


def deduplicate(preds: Iterable[dict], key: str = "instance_id") -> list[dict]:
    """Keep the first prediction for each value of ``key``; entries without the key (or ``None``) are all kept."""
    seen: set[Hashable] = set()
    out: list[dict] = []
    for p in preds:
        value = p.get(key)
        if value is not None:
            value = _hashable(value)
            if value in seen:
                continue
            seen.add(value)
        out.append(p)
    return out


def _hashable(value: Any) -> Hashable:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return value.item()
    if isinstance(value, list):
        return tuple(value)
    return value
