"""Shared pieces of the mid-epoch resume tests (pose and instance-segmentation training data)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch


class Killed(Exception):
    """Raised by :class:`StopAt` right after its checkpoint: like a kill, nothing after it runs."""


class StopAt(L.Callback):
    """Save a checkpoint after global step ``step`` and stop at once (what a kill after a last.ckpt write leaves);
    ``epoch_end``: save in ``on_train_epoch_end`` of the epoch that ends with that step instead."""

    def __init__(self, step: int, path: Path, epoch_end: bool = False) -> None:
        self.step, self.path, self.epoch_end = step, path, epoch_end

    def _stop(self, trainer) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Killed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.epoch_end:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.epoch_end:
            self._stop(trainer)


def assert_resumes_like_uninterrupted(
    fit: Callable[..., tuple[list, L.Trainer]],
    full: list,
    cases: list[tuple[int, bool, tuple[int, int]]],
    tmp_path: Path,
) -> None:
    """For each ``(step, epoch_end, (epoch, batches))``: a run stopped by ``StopAt(step, .., epoch_end)`` recorded
    ``full[:step]``, its checkpoint holds that loader state, and the run resumed from it records ``full[step:]``.
    ``fit(stop=..., ckpt=...)`` returns ``(records, trainer)``."""
    for step, epoch_end, saved in cases:
        ckpt = tmp_path / f"stop{step}_{epoch_end}.ckpt"
        head, _ = fit(stop=StopAt(step, ckpt, epoch_end))
        assert head == full[:step]
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["loops"]["fit_loop"]["state_dict"]
        assert [(s["epoch"], s["batches"]) for s in state["combined_loader"]] == [saved]
        tail, _ = fit(ckpt=ckpt)
        assert tail == full[step:], (step, epoch_end)
