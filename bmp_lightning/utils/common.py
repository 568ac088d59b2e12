"""Small helpers shared by every layer: plain containers, the distributed world, the device, torch threads."""

from __future__ import annotations

from typing import Any

import torch
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


def resolve_device(device: str | None) -> str:
    """``auto`` (or nothing) -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def set_torch_threads(threads: int | None) -> None:
    """Intra-op threads of this process (None: leave torch's default, one per core).

    On a small CPU machine the default oversubscribes the cores once DataLoader workers run beside the training
    process, and OpenMP's spinning threads then slow a step down several times; 1 is right for CPU smoke runs.
    """
    if threads is None:
        return
    if int(threads) < 1:
        raise ValueError(f"torch_threads must be >= 1 or null, got {threads}")
    torch.set_num_threads(int(threads))
