"""Small helpers shared by the DataModules and LightningModules."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(obj: Any) -> Any:
    """OmegaConf containers (what Hydra passes), anywhere inside dicts/lists/tuples -> plain dicts and lists.

    Checkpoints reload with ``weights_only=True`` and hyper-parameters are logged as json, so neither may hold them.
    """
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def dist_world() -> tuple[int, int]:
    """``(world_size, rank)`` of torch.distributed when initialised, else ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
