"""Exponential-momentum EMA of a network (MMEngine ``ExpMomentumEMA`` with ``update_buffers=True``).

Update ``k`` (0-based) after the ``k``-th optimizer step:

    k == 0:  ema <- src                                      (copy)
    k >= 1:  m = (1 - m0) * exp(-(1 + k) / gamma) + m0
             ema <- lerp(ema, src, m) = (1 - m) * ema + m * src

for every parameter and every floating-point buffer (BN running statistics); integer buffers
(``num_batches_tracked``) are copied. ``m`` starts near 1 (the average follows the network closely) and decays
to ``m0`` over a few ``gamma`` steps. Spec: MMEngine ``averaged_model.py`` (momentum 0.0002, gamma 2000).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_momentum(step: int, momentum: float = 0.0002, gamma: float = 2000.0) -> float:
    """Weight of the source network at update ``step`` (``step >= 1``; update 0 is a copy)."""
    return (1.0 - momentum) * math.exp(-float(1 + step) / gamma) + momentum


class ExpMomentumEMA(nn.Module):
    """A frozen copy of ``model`` averaged with :func:`ema_momentum`.

    The copy lives in ``self.module`` (state-dict keys ``module.<name>``), frozen; evaluate it in eval mode. ``steps``
    (a buffer, so it is checkpointed) counts the updates done.

    Args:
        model: the network to average (deep-copied; the original is not modified).
        momentum: ``m0``, the asymptotic weight of the source network.
        gamma: decay length of the momentum, in updates.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0002, gamma: float = 2000.0) -> None:
        super().__init__()
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        if gamma <= 0:
            raise ValueError(f"EMA gamma must be positive, got {gamma}")
        self.momentum = float(momentum)
        self.gamma = float(gamma)
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA update from ``model`` (the same architecture; shared tensors are visited once)."""
        src = dict(model.state_dict(keep_vars=True))
        dst = self.module.state_dict(keep_vars=True)
        if src.keys() != dst.keys():
            missing, extra = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
            raise ValueError(f"EMA: model and averaged copy differ (missing {missing[:5]}, extra {extra[:5]})")
        step = int(self.steps)
        m = ema_momentum(step, self.momentum, self.gamma)
        seen: set[int] = set()
        for name, avg in dst.items():
            if id(avg) in seen:  # aliased convs appear once per alias in a state dict
                continue
            seen.add(id(avg))
            new = src[name].detach().to(device=avg.device)
            if step == 0 or not avg.dtype.is_floating_point:
                avg.data.copy_(new)
            else:
                avg.data.lerp_(new.to(avg.dtype), m)
        self.steps += 1
