"""Skipped training data (``data.skip_bad_samples=true``), counted over DataLoader workers and DDP ranks.

Interface with the data side: a training dataset with ``skip_bad_samples`` holds a :class:`~bmp_lightning.data.
records.SkipLog` as ``dataset.skips``: one shared-memory flag per sample that its DataLoader workers set when they
skip it, so the training process sees every worker's skips. Each DDP rank has its own log (it marks the samples its
sampler drew); the flags are combined with one ``all_reduce(MAX)`` (a sample is bad on every rank that tries it).
Annotation entries the readers skipped (``datamodule.read_reports``, ``dataset.entries_skipped``) are read in
every process alike and need no reduction.

:func:`log_skips` (called by the LightningModules at every training epoch end, on all ranks) logs
``train/skipped_samples`` (distinct samples skipped so far in this run, all workers and ranks) and
``train/skipped_entries``; both reach the logger and, as callback metrics, ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import torch


def skipped_samples(dataset: Any, strategy: Any = None) -> int | None:
    """Distinct samples ``dataset`` skipped so far, over its DataLoader workers and (with ``strategy``) all DDP ranks;
    None when the dataset does not skip (``skip_bad_samples`` off) or keeps no :class:`SkipLog`."""
    skips = getattr(dataset, "skips", None)
    if skips is None or not getattr(dataset, "skip_bad_samples", False):
        return None
    flags = skips.flags
    if strategy is not None and getattr(strategy, "world_size", 1) > 1:
        import torch.distributed as dist

        flags = flags.to(strategy.root_device, copy=True)  # NCCL needs it on the device; never reduce the shared one
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int((flags > 0).sum())


def skipped_entries(datamodule: Any) -> int:
    """Annotation entries the readers skipped (the same in every process: no reduction)."""
    n = sum(int(getattr(r, "skipped", 0)) for r in getattr(datamodule, "read_reports", []) or [])
    ds = getattr(datamodule, "train_dataset", None)
    return n + len(getattr(ds, "entries_skipped", []) or [])


def log_skips(module: Any) -> dict[str, int]:
    """Log ``train/skipped_samples`` and ``train/skipped_entries`` (collective under DDP: call on every rank)."""
    trainer = module.trainer
    dm = getattr(trainer, "datamodule", None)
    samples = skipped_samples(getattr(dm, "train_dataset", None), trainer.strategy)
    if samples is None:
        return {}
    counts = {"train/skipped_samples": samples, "train/skipped_entries": skipped_entries(dm)}
    for name, value in counts.items():
        module.log(name, torch.tensor(float(value)), sync_dist=False, rank_zero_only=False)
    return counts
