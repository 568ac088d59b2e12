"""What keeps a fit honest, shared by the LightningModules: exact mid-epoch checkpoints, non-finite losses and weights.

- :func:`keep_epoch_unfinished`: a run stopped by ``max_steps`` in the middle of an epoch still runs Lightning's
  epoch-end hooks, and the ``last.ckpt`` they write marks that epoch as finished, so a resume from it skipped the rest
  of the epoch. The checkpoint is written as the mid-epoch state it is.
- :class:`NonFiniteGuard`: a NaN/inf loss stops the run (:class:`NonFiniteLossError`, naming epoch, step and the
  last checkpoint, all of which hold finite weights), or with ``max_nonfinite_steps: N`` up to N such steps are
  skipped (no optimizer step, counted, logged as ``train/nonfinite_steps``).
- :func:`check_finite_state`: a checkpoint with non-finite weights is never written (``last``/``best`` included).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bmp_lightning.structures.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf (and the tolerance ``max_nonfinite_steps`` is used up)."""


class NonFiniteWeightsError(UserError):
    """A checkpoint was about to be written with NaN/inf weights."""


# ---------------------------------------------------------------------------------------------- checkpoints
def keep_epoch_unfinished(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Mark the epoch unfinished in ``checkpoint`` when ``max_steps`` ended the fit before the epoch's last batch."""
    fit_loop = getattr(trainer, "fit_loop", None)
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if fit_loop is None or not loops or fit_loop.max_steps in (None, -1):
        return
    batches = fit_loop.epoch_loop.batch_progress
    epoch = fit_loop.epoch_progress.current
    cut_short = (
        fit_loop.epoch_loop.global_step >= fit_loop.max_steps
        and not batches.is_last_batch
        and batches.current.ready < fit_loop.max_batches
        and epoch.processed == epoch.started  # on_advance_end has counted the epoch as processed
    )
    if not cut_short:
        return
    for part in ("current", "total"):
        progress = loops["epoch_progress"][part]
        progress["processed"] = progress["started"] - 1
        progress["completed"] = min(progress["completed"], progress["processed"])
    checkpoint["epoch"] = loops["epoch_progress"]["current"]["completed"]


def check_loader_state_applied(trainer: Any) -> None:
    """At ``on_train_start`` of a resumed fit: raise if the checkpoint's training-loader state was never applied.

    Lightning applies it only while it builds the training loader after restoring the loops; a loader built earlier
    (``trainer.estimated_stepping_batches`` in ``configure_optimizers`` did that) keeps the state pending forever, and
    the resumed epoch silently restarts from its first batch. Loud instead of silently wrong.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if pending and getattr(fit_loop, "restarting", False):  # not restarting: an epoch-end checkpoint, nothing to apply
        raise RuntimeError(
            "the checkpoint's training-data position was not applied: the training DataLoader was built before "
            "Lightning restored the checkpoint (e.g. trainer.estimated_stepping_batches in configure_optimizers; use "
            "bmp_lightning.models.optim.train_steps_per_epoch), so the resumed epoch would replay its first batches"
        )


def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The first key whose floating-point tensor holds a NaN/inf (nested mappings are searched), else None."""
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            inner = first_nonfinite(value)
            if inner is not None:
                return f"{key}.{inner}"
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return str(key)
    return None


def check_finite_state(checkpoint: Mapping[str, Any], path: Any = None, trainer: Any = None) -> None:
    """Raise :class:`NonFiniteWeightsError` when ``checkpoint['state_dict']`` holds a NaN/inf weight (naming the
    target ``path`` and, with ``trainer``, the last checkpoint written, which holds finite weights)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    bad = first_nonfinite(state)
    if bad is not None:
        where = (
            f" at epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}"
            if "epoch" in checkpoint
            else ""
        )
        target = f" {path}" if path is not None else ""
        last = (
            f"; last checkpoint (finite weights): {latest_checkpoint(trainer) or 'none'}" if trainer is not None else ""
        )
        raise NonFiniteWeightsError(
            f"refusing to write checkpoint{target}: non-finite weights in {bad}{where} (the training diverged; "
            f"lower model.lr or resume from an earlier checkpoint){last}"
        )


def latest_checkpoint(trainer: Any) -> str | None:
    """The newest checkpoint file the trainer's checkpoint callbacks wrote (all hold finite weights), else None."""
    paths = []
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        for attr in ("last_model_path", "best_model_path"):
            p = getattr(cb, attr, "")
            if p and Path(p).is_file():
                paths.append(Path(p))
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None


# ---------------------------------------------------------------------------------------------- losses
class NonFiniteGuard:
    """Per-step check of the training loss; owned by a LightningModule (``self.nonfinite = NonFiniteGuard(n)``).

    ``before_forward(module)`` at the start of ``training_step`` keeps the buffers (BatchNorm running statistics,
    which the forward pass of a NaN batch corrupts) when skipping is allowed; ``check(module, loss)`` returns True when
    the step must be skipped and raises when the tolerance is used up; the decision is taken across
    DDP ranks, so every rank skips or stops together. ``skip_step(optimizer)`` in ``optimizer_step`` drops the step's
    gradients and restores the buffers instead of stepping.

    Args:
        max_steps: how many non-finite steps to skip before stopping (0: stop at the first).
    """

    def __init__(self, max_steps: int = 0) -> None:
        if int(max_steps) < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_steps}")
        self.max_steps = int(max_steps)
        self.count = 0
        self.pending = False  # this (accumulated) optimizer step saw a non-finite loss
        self._buffers: dict[str, torch.Tensor] | None = None
        self._module: Any = None

    def before_forward(self, module: Any) -> None:
        if self.max_steps:
            self._buffers = {k: b.detach().clone() for k, b in module.named_buffers()}

    def check(self, module: Any, loss: torch.Tensor) -> bool:
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = module._trainer  # None when a step is called by hand (notebooks, tests): nothing to guard then
        if trainer is None:
            return False
        bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return False
        self.count += 1
        where = (
            f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx})"
        )
        value = float(loss.detach().float().flatten()[0]) if loss.numel() else math.nan
        if self.count > self.max_steps:
            last = latest_checkpoint(trainer)
            raise NonFiniteLossError(
                f"non-finite training loss ({value}) at {where}; last checkpoint (finite weights): "
                f"{last or 'none written yet'}. Lower model.lr, or allow skipping with model.max_nonfinite_steps=N"
                + (f" (used up: {self.max_steps})" if self.max_steps else "")
            )
        log.warning(
            "non-finite training loss (%s) at %s: step skipped (%d of at most %d)",
            value,
            where,
            self.count,
            self.max_steps,
        )
        self.pending = True
        self._module = module
        return True

    def skip_step(self, optimizer: Any) -> bool:
        """After the closure ran: True (and the gradients dropped) when this optimizer step must not happen."""
        if not self.pending:
            return False
        self.pending = False
        optimizer.zero_grad(set_to_none=True)
        if self._buffers is not None and self._module is not None:  # after backward: autograd may still need them
            with torch.no_grad():
                for k, b in self._module.named_buffers():
                    if k in self._buffers:
                        b.copy_(self._buffers[k])
        self._module = None
        return True

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state.get("count", 0))


def guarded_optimizer_step(module: Any, optimizer: Any, closure: Any) -> bool:
    """``LightningModule.optimizer_step`` body: run the closure (forward, backward; DDP syncs the gradients), then
    step unless ``module.nonfinite`` skips it. Returns whether the optimizer stepped."""
    loss = closure() if closure is not None else None
    if module.nonfinite.skip_step(optimizer):
        return False
    optimizer.step(closure=lambda: loss)  # the precision plugin still clips / unscales after this "closure"
    return True
