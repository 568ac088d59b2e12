"""Skipped training samples (``data.skip_bad_samples=true``), counted over DataLoader workers and DDP ranks.

Interface with the datasets: in skip mode every training sample carries ``"skipped"``, the number of bad samples
the dataset passed over to produce it (0 almost always), and the collate stacks it into ``batch["skipped"]`` (a
``(B,)`` tensor). Counting in the batch, not in a dataset attribute, is what reaches the training process from the
DataLoader workers (each worker holds its own copy of the dataset). :class:`SkipCounter` sums it per rank during an
epoch, adds the ranks' sums at the epoch end (one all-reduce per epoch) and logs the run total as
``train/skipped_samples`` (logger and ``metrics.json``); the total is kept in checkpoints so a resumed run goes on
counting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_skipped(batch: Any) -> int | None:
    """How many bad samples the dataset skipped to fill ``batch``; None when the batch does not report skips."""
    if not isinstance(batch, Mapping) or "skipped" not in batch:
        return None
    value = batch["skipped"]
    return int(value.sum()) if isinstance(value, torch.Tensor) else int(sum(value))


class SkipCounter:
    """Run total of skipped training samples, summed over workers (through the batches) and ranks (epoch end)."""

    def __init__(self) -> None:
        self.total = 0  # all ranks, finished epochs (and the resumed run's past)
        self.epoch = 0  # this rank, the running epoch
        self.reporting = False  # the data reports skips (skip mode): log the count, 0 included

    def add(self, batch: Any) -> None:
        n = batch_skipped(batch)
        if n is not None:
            self.reporting = True
            self.epoch += n

    def epoch_end(self, module: Any) -> None:
        """Add the ranks' epoch counts to the total and log it (``train/skipped_samples``)."""
        reporting = bool(module.trainer.strategy.reduce_boolean_decision(self.reporting, all=False))
        if not reporting:
            return
        local = torch.tensor(float(self.epoch), device=module.device)
        self.total += int(module.trainer.strategy.reduce(local, reduce_op="sum").item())
        self.epoch = 0
        module.log("train/skipped_samples", float(self.total), sync_dist=False, rank_zero_only=False)

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.total, self.epoch = int(state.get("total", 0)), int(state.get("epoch", 0))
