"""Layer-wise lr decay parameter groups and the ViTPose warm-up + multi-step schedule.

What MMPose's ``LayerDecayOptimWrapperConstructor`` actually does (``layer_decay_optim_wrapper.py``; its
``custom_keys`` are ignored):
- no weight decay for 1-D params, names ending in ``.bias`` and names containing ``pos_embed``;
- layer id 0: patch embedding, position embedding, cls/mask tokens; id i+1: backbone block i;
  id ``num_layers - 1``: everything else (final norm, head);
- lr of a group = ``base_lr * layer_decay ** (num_layers - 1 - id)``.
Our block names are ``backbone.blocks.{i}``; MMPose's ``backbone.layers.{i}`` is understood too.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_EMBED = re.compile(r"(?:^|\.)backbone\.(?:patch_embed\.|pos_embed$|cls_token$|mask_token$)")
_BLOCK = re.compile(r"(?:^|\.)backbone\.(?:blocks|layers)\.(\d+)\.")


def layer_id(name: str, num_layers: int = 14) -> int:
    """Layer id of a parameter name (see module docstring); ``num_layers`` = backbone depth + 2."""
    if _EMBED.search(name):
        return 0
    m = _BLOCK.search(name)
    if m:
        block = int(m.group(1))
        if block + 1 >= num_layers - 1:
            raise ValueError(f"{name}: block {block} needs num_layers >= {block + 3}, got {num_layers}")
        return block + 1
    return num_layers - 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """MMPose rule: 1-D params (norms, biases), any ``.bias`` and ``pos_embed`` get no weight decay."""
    return param.ndim == 1 or name.endswith(".bias") or "pos_embed" in name


def layer_decay_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 0.75,
    num_layers: int = 14,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay (one group per (layer id, decay/no-decay)).

    Each group has ``params``, ``lr = base_lr * lr_scale``, ``weight_decay``, and records ``lr_scale``, ``layer_id``
    and ``group_name`` (e.g. ``layer_3_decay``). Frozen parameters are left out. Schedulers built on
    ``LambdaLR`` scale each group from its own initial lr, preserving the per-layer ratios.
    """
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        decay = not no_weight_decay(name, param)
        key = f"layer_{lid}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - lid)
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": base_lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": lid,
                "group_name": key,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["weight_decay"]))


def warmup_multistep_factor(
    step: int,
    steps_per_epoch: int,
    warmup_iters: int = 500,
    warmup_factor: float = 0.001,
    milestones: Sequence[int] = (170, 200),
    gamma: float = 0.1,
) -> float:
    """lr factor at optimizer step ``step`` (0-based): MMEngine ``LinearLR`` x ``MultiStepLR`` (by epoch), chained.

    Warm-up: ``warmup_factor + (1 - warmup_factor) * step / warmup_iters`` for ``step < warmup_iters``; then
    ``gamma ** (number of milestones <= epoch)`` with ``epoch = step // steps_per_epoch``.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    warm = warmup_factor + (1.0 - warmup_factor) * step / warmup_iters if step < warmup_iters else 1.0
    epoch = step // steps_per_epoch
    return warm * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def build_warmup_multistep(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    warmup_iters: int = 500,
    warmup_factor: float = 0.001,
    milestones: Sequence[int] = (170, 200),
    gamma: float = 0.1,
) -> LambdaLR:
    """Per-step ``LambdaLR`` for :func:`warmup_multistep_factor`; step it after every optimizer step
    (Lightning: ``{"scheduler": s, "interval": "step"}``). Each group keeps its layer-decay ratio."""
    milestones = tuple(milestones)

    def factor(step: int) -> float:
        return warmup_multistep_factor(step, steps_per_epoch, warmup_iters, warmup_factor, milestones, gamma)

    return LambdaLR(optimizer, factor)


build_warmup_multistep_scheduler = build_warmup_multistep  # longer alias


def rtmdet_lr_factor(
    step: int,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_iters: int = 1000,
    warmup_factor: float = 1e-5,
    cosine_begin_epoch: int = 150,
    eta_min_ratio: float = 0.05,
) -> float:
    """lr multiplier at optimizer step ``step`` (0-based): MMEngine ``LinearLR`` then ``CosineAnnealingLR``.

    ``warm = warmup_factor + (1 - warmup_factor) * step / warmup_iters`` before ``warmup_iters``, else 1;
    ``cos = 1`` before ``b = cosine_begin_epoch * steps_per_epoch``, then
    ``eta + (1 - eta) * (1 + cos(pi * (step - b) / (e - b))) / 2`` up to ``e = max_epochs * steps_per_epoch``,
    ``eta`` after. Returns ``warm * cos`` (the two only overlap in very short runs).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    warm = warmup_factor + (1.0 - warmup_factor) * step / warmup_iters if step < warmup_iters else 1.0
    begin, end = cosine_begin_epoch * steps_per_epoch, max_epochs * steps_per_epoch
    if step < begin:
        cos = 1.0
    elif step >= end:
        cos = eta_min_ratio
    else:
        cos = eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * (step - begin) / (end - begin)))
    return warm * cos


def build_warmup_cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_iters: int = 1000,
    warmup_factor: float = 1e-5,
    cosine_begin_epoch: int = 150,
    eta_min_ratio: float = 0.05,
) -> LambdaLR:
    """Per-step ``LambdaLR`` for :func:`rtmdet_lr_factor` (RTMDet-Ins); step it after every optimizer step."""
    if not max_epochs or max_epochs < 0:
        raise ValueError("the warm-up + cosine schedule needs trainer.max_epochs (the cosine ends there)")

    def factor(step: int) -> float:
        return rtmdet_lr_factor(
            step, steps_per_epoch, max_epochs, warmup_iters, warmup_factor, cosine_begin_epoch, eta_min_ratio
        )

    return LambdaLR(optimizer, factor)


def make_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Any) -> torch.optim.Optimizer:
    """Call an optimizer partial (the ``optimizer`` config group) on parameter groups; list values from the YAML
    (``betas``) become tuples, as torch's defaults are, so checkpoints hold the same optimizer state either way."""
    if isinstance(factory, functools.partial):
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in factory.keywords.items()}
        return factory.func(params, *factory.args, **kw)
    return factory(params)


def train_steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one training epoch, for per-step schedules that change by epoch.

    Read from the datamodule's ``train_batch_sampler()`` (its length is arithmetic on the dataset sizes) instead of
    ``trainer.estimated_stepping_batches``: that property builds the training DataLoader and its first iterator when
    ``configure_optimizers`` runs, i.e. before Lightning restores the loops from ``ckpt_path``, and Lightning never
    applies the checkpoint's loader state to a loader it already has, so a mid-epoch resume replayed the epoch from its
    first batch. It also divided by ``max_epochs`` after capping at ``max_steps``, so the schedule depended on when a
    run was told to stop. ``limit_train_batches`` and ``accumulate_grad_batches`` are applied as Lightning does. A
    datamodule without ``train_batch_sampler`` (not resumable anyway) falls back to the estimate.
    """
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    dm = getattr(trainer, "datamodule", None)
    if dm is not None and callable(getattr(dm, "train_batch_sampler", None)):
        batches = _parse_num_batches(RunningStage.TRAINING, len(dm.train_batch_sampler()), trainer.limit_train_batches)
    else:
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        est = trainer.estimated_stepping_batches
        batches = est // max_epochs if math.isfinite(est) and trainer.max_steps == -1 else trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("an epoch-based lr schedule needs a training loader with a length")
    return max(1, math.ceil(int(batches) / max(1, int(trainer.accumulate_grad_batches))))
