"""Multi-dataset batches with a fixed share per source (BMP's MMPose ``MultiSourceSampler``, as a batch sampler).

Every batch of ``batch_size`` holds ``counts[s]`` samples of source ``s``: ``int(batch_size * r_s / sum(r))`` for
every source but the first, which takes the remainder (22 COCO / 21 MPII / 21 AIC of 64 for ratios [1, 1, 1]).
Each source draws from its own infinite stream of shuffled permutations of its indices, seeded by
``(seed, epoch, source)``; under DDP rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of every stream,
so the ranks' shares are disjoint within a permutation. An "epoch" is measured in combined samples, as upstream:
``ceil(total / W)`` samples per rank, i.e. ``ceil(ceil(total / W) / batch_size)`` batches (``drop_last``: floor).

Differences from upstream, on purpose: streams restart from a new seed every epoch (upstream keeps one generator
for the whole run, so ``set_epoch`` is a no-op there), and the last batch of an epoch is kept by default
(upstream yields only whole batches while reporting the rounded-up length).

Exact mid-epoch resume: :meth:`MultiSourceBatchSampler.state_dict` records the epoch and how many batches of it were
handed out; after :meth:`~MultiSourceBatchSampler.load_state_dict` the next ``__iter__`` fast-forwards the index
streams (indices only, no data is loaded) past those batches and continues exactly as an uninterrupted run would.
:class:`ResumableDataLoader` exposes that state to Lightning (which saves it in ``loops.fit_loop.combined_loader``
of every checkpoint and restores it before it creates the iterator of a mid-epoch resume), counting the batches the
consumer took in the main process rather than those the workers prefetched. A checkpoint from a different setup
(source sizes, batch size or shares, world size, seed, shuffle, drop_last) cannot be continued in the same order:
by default that logs a warning and restarts the checkpoint's epoch from its first batch (weights and optimiser are
still valid, and resuming on another number of GPUs is a legitimate choice); ``strict_resume=True`` raises instead.

That machinery lives in :class:`ResumableBatchSampler`; :class:`ShardedBatchSampler` is the same for one dataset in
``DistributedSampler`` order (instance segmentation), and :func:`fit_loop_epoch` gives a fresh sampler the epoch a
(resumed) fit loop is about to run, since Lightning calls ``set_epoch`` only after it created the first iterator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bmp_lightning.utils.common import dist_world

log = logging.getLogger(__name__)

# what must be equal between a checkpoint and this sampler for the epoch to continue in the same order
_SETUP_KEYS = ("source_sizes", "batch_size", "counts", "world_size", "seed", "shuffle", "drop_last")


def per_source_counts(batch_size: int, source_ratio: Sequence[float]) -> list[int]:
    """Samples per source in one batch: ``int(B * r_s / sum(r))``, the first source takes the remainder."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not source_ratio or any(r < 0 for r in source_ratio) or sum(source_ratio) <= 0:
        raise ValueError(f"source_ratio must be non-negative with a positive sum, got {list(source_ratio)}")
    total = float(sum(source_ratio))
    counts = [int(batch_size * r / total) for r in source_ratio]
    counts[0] = batch_size - sum(counts[1:])
    return counts


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's when initialised, else a single process."""
    world, current = dist_world()
    num_replicas = world if num_replicas is None else num_replicas
    rank = current if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} not in [0, {num_replicas})")
    return num_replicas, rank


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``; this forwards it to the batch sampler."""

    def __init__(self, owner: ResumableBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class ResumableBatchSampler(Sampler[list[int]]):
    """Base of the batch samplers whose epoch can be continued exactly after a restart.

    Holds the epoch (``set_epoch`` reseeds the order and tells the registered listeners, e.g. the dataset's
    augmentation RNG), the resume bookkeeping and :meth:`state_dict`/:meth:`load_state_dict`. A subclass defines
    ``SETUP_KEYS`` and :meth:`_setup` (what fixes the order: a checkpoint from a different setup is not continued),
    ``__len__`` and :meth:`_batches` (the epoch's batches of one rank from a given batch on, without loading data).

    Args:
        num_replicas, rank: DDP world size and rank; default: read from torch.distributed at iteration time.
        strict_resume: :meth:`load_state_dict` raises on a checkpoint from a different setup (default: warn and
            restart that epoch from its first batch).
    """

    SETUP_KEYS: tuple[str, ...] = ()

    def __init__(self, num_replicas: int | None = None, rank: int | None = None, strict_resume: bool = False) -> None:
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.sampler = _EpochHook(self)
        self._epoch_callbacks: list[Callable[[int], None]] = []
        self.strict_resume = bool(strict_resume)
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) for the next __iter__
        # the latest iteration: how many were started, its epoch, its first batch (> 0 after a resume) and how many
        # batches of its epoch have been handed out (skipped ones included)
        self.iter_id = 0
        self.iter_epoch = 0
        self.iter_start = 0
        self._position: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """New order for the epoch; also tells registered listeners (the dataset's augmentation RNG)."""
        self.epoch = int(epoch)
        for fn in self._epoch_callbacks:
            fn(self.epoch)

    def add_epoch_callback(self, fn: Callable[[int], None]) -> None:
        self._epoch_callbacks.append(fn)

    def __len__(self) -> int:
        raise NotImplementedError

    def _batches(self, epoch: int, world: int, rank: int, skip: int) -> Iterator[list[int]]:
        """Batches ``skip, skip + 1, ..., len(self) - 1`` of ``epoch`` for ``rank`` of ``world``."""
        raise NotImplementedError

    def _setup(self) -> dict[str, Any]:
        """The values of ``SETUP_KEYS`` (plain ints, bools and lists)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        world, rank = _dist_info(self.num_replicas, self.rank)
        epoch, skip = self.epoch, 0
        if self._resume is not None:
            resume_epoch, resume_batches = self._resume
            self._resume = None
            if resume_epoch == epoch:
                skip = min(resume_batches, len(self))
            else:  # set_epoch moved on since load_state_dict (e.g. the loop finished that epoch): start afresh
                log.info(
                    "batch sampler: resume state is for epoch %d, iterating epoch %d from its start",
                    resume_epoch,
                    epoch,
                )
        self.iter_id += 1
        self.iter_epoch, self.iter_start, self._position = epoch, skip, skip
        for b, batch in enumerate(self._batches(epoch, world, rank, skip), start=skip):
            self._position = b + 1  # counted before yield: the consumer holds it once next() returns
            yield batch

    # ------------------------------------------------------------------ resume
    def state_dict(self, batches: int | None = None) -> dict[str, Any]:
        """Where this epoch stands: ``{epoch, batches, num_batches}`` plus the setup that fixes the order.

        ``batches``: batches of the latest iteration's epoch handed out so far; by default those this sampler
        yielded (a pending :meth:`load_state_dict` counts as yielded). :class:`ResumableDataLoader` passes the
        number its consumer took instead (workers run ahead of it). Identical on every rank (no rank in it).
        """
        if self._resume is not None:
            epoch, done = self._resume
        elif self._position is not None:
            epoch, done = self.iter_epoch, self._position
        else:
            epoch, done = self.epoch, 0
        if batches is not None:
            done = int(batches)
        return {"epoch": int(epoch), "batches": int(done), "num_batches": len(self), **self._setup()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue ``state``'s epoch after its ``batches`` batches at the next ``__iter__``.

        Sets the epoch (and tells the epoch listeners, so the dataset's augmentation follows before any sample is
        loaded). A finished epoch resumes at the start of the next one. A different setup warns and restarts the
        epoch from its first batch, or raises ``ValueError`` with ``strict_resume``.
        """
        missing = [k for k in ("epoch", "batches", *self.SETUP_KEYS) if k not in state]
        if missing:
            raise ValueError(f"batch sampler state lacks {missing}: not a {type(self).__name__} state_dict")
        epoch, done = int(state["epoch"]), int(state["batches"])
        mine = self._setup()
        diff = {k: (state[k], mine[k]) for k in self.SETUP_KEYS if _plain(state[k]) != _plain(mine[k])}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
            if self.strict_resume:
                raise ValueError(f"cannot resume the training data order of epoch {epoch} ({what})")
            log.warning(
                "training data setup differs from the checkpoint's (%s): epoch %d restarts from its first batch "
                "instead of continuing after batch %d",
                what,
                epoch,
                done,
            )
            done = 0
        if done >= len(self):  # the checkpoint was taken after the epoch's last batch
            epoch, done = epoch + 1, 0
        self.set_epoch(epoch)
        self._resume = (epoch, done) if done > 0 else None
        self._position = None


class MultiSourceBatchSampler(ResumableBatchSampler):
    """Batches of global indices into the concatenation of the sources, with fixed per-source counts.

    Args:
        source_sizes: number of samples of each source, in concatenation order.
        batch_size: samples per batch (per device).
        source_ratio: relative share of each source in a batch.
        shuffle: shuffled permutations (else each stream cycles 0..n-1 in order).
        seed: base seed, the same on every rank.
        num_replicas, rank: DDP world size and rank; default: read from torch.distributed at iteration time.
        drop_last: report/yield ``floor`` instead of ``ceil`` batches per epoch.
        strict_resume: :meth:`load_state_dict` raises on a checkpoint from a different setup (default: warn and
            restart that epoch from its first batch).
    """

    SETUP_KEYS = _SETUP_KEYS

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int = 64,
        source_ratio: Sequence[float] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        strict_resume: bool = False,
    ) -> None:
        super().__init__(num_replicas=num_replicas, rank=rank, strict_resume=strict_resume)
        self.source_sizes = [int(n) for n in source_sizes]
        if not self.source_sizes:
            raise ValueError("need at least one source")
        source_ratio = [1.0] * len(self.source_sizes) if source_ratio is None else list(source_ratio)
        if len(source_ratio) != len(self.source_sizes):
            raise ValueError(f"{len(source_ratio)} ratios for {len(self.source_sizes)} sources")
        self.batch_size = int(batch_size)
        self.source_ratio = source_ratio
        self.counts = per_source_counts(self.batch_size, source_ratio)
        empty = [i for i, (n, c) in enumerate(zip(self.source_sizes, self.counts)) if c > 0 and n == 0]
        if empty:
            raise ValueError(f"sources {empty} are empty but have a non-zero share of the batch")
        self.offsets = np.concatenate([[0], np.cumsum(self.source_sizes)[:-1]]).astype(np.int64).tolist()
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last

    def __len__(self) -> int:
        world, _ = _dist_info(self.num_replicas, self.rank)
        per_rank = math.ceil(sum(self.source_sizes) / world)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def _stream(self, source: int, world: int, rank: int, epoch: int, start: int = 0) -> Iterator[int]:
        """This rank's share of source ``source``'s infinite stream of ``epoch``, as global indices.

        ``start``: how many of this rank's draws to skip (a resume); whole permutations are skipped by drawing them
        (the generator must advance) without touching their indices one by one.
        """
        n, offset = self.source_sizes[source], self.offsets[source]
        rng = np.random.default_rng([self.seed, epoch, source])
        target = rank + start * world  # global stream position of this rank's first wanted draw
        pos = 0  # position in the (conceptually concatenated) stream of permutations
        while True:
            perm = rng.permutation(n) if self.shuffle else None
            if pos + n > target:
                # positions pos..pos+n-1 live in this permutation; keep those congruent to rank modulo world
                # (target is congruent to rank, so it is the first such position once it lies in this permutation)
                first = max(target - pos, (rank - pos) % world)
                picked = perm[first::world] if perm is not None else np.arange(first, n, world)
                for i in picked.tolist():
                    yield i + offset
            pos += n

    def _batches(self, epoch: int, world: int, rank: int, skip: int) -> Iterator[list[int]]:
        streams = [self._stream(s, world, rank, epoch, start=skip * count) for s, count in enumerate(self.counts)]
        for _ in range(skip, len(self)):
            batch: list[int] = []
            for stream, count in zip(streams, self.counts):
                batch.extend(next(stream) for _ in range(count))
            yield batch

    def _setup(self) -> dict[str, Any]:
        world, _ = _dist_info(self.num_replicas, self.rank)
        return {
            "source_sizes": list(self.source_sizes),
            "batch_size": self.batch_size,
            "counts": list(self.counts),
            "world_size": world,
            "seed": self.seed,
            "shuffle": bool(self.shuffle),
            "drop_last": bool(self.drop_last),
        }


class ShardedBatchSampler(ResumableBatchSampler):
    """Batches of one dataset in ``DataLoader(batch_size, sampler=DistributedSampler(...))`` order, resumable.

    The same indices and batches as torch's ``DistributedSampler(shuffle, seed, drop_last=False)`` under a
    ``DataLoader(batch_size, drop_last)``: a ``torch.randperm`` seeded with ``seed + epoch`` (else ``0..n-1``), padded
    with its own head to ``ceil(n / W) * W`` and dealt out ``rank::W``; the last batch of a rank is partial unless
    ``drop_last``. Not distributed: one replica, i.e. a plain shuffled loader.

    Args:
        dataset_size: number of samples.
        batch_size: samples per batch (per device).
        shuffle, seed: as ``DistributedSampler`` (seed the same on every rank).
        num_replicas, rank: DDP world size and rank; default: read from torch.distributed at iteration time.
        drop_last: drop each rank's last partial batch (the DataLoader's ``drop_last``).
        strict_resume: see :class:`ResumableBatchSampler`.
    """

    SETUP_KEYS = ("dataset_size", "batch_size", "world_size", "seed", "shuffle", "drop_last")

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        strict_resume: bool = False,
    ) -> None:
        super().__init__(num_replicas=num_replicas, rank=rank, strict_resume=strict_resume)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be non-negative, got {dataset_size}")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)

    def _per_rank(self, world: int) -> int:
        return math.ceil(self.dataset_size / world)

    def __len__(self) -> int:
        world, _ = _dist_info(self.num_replicas, self.rank)
        per_rank = self._per_rank(world)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def rank_indices(self, epoch: int, world: int, rank: int) -> list[int]:
        """This rank's ``ceil(n / W)`` indices of ``epoch``, exactly as ``DistributedSampler`` lists them."""
        n = self.dataset_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self._per_rank(world) * world
        if n and total > n:  # pad with the order's head (repeated when the padding is longer than the data)
            order += (order * math.ceil((total - n) / n))[: total - n]
        return order[rank:total:world]

    def _batches(self, epoch: int, world: int, rank: int, skip: int) -> Iterator[list[int]]:
        mine = self.rank_indices(epoch, world, rank)
        for b in range(skip, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def _setup(self) -> dict[str, Any]:
        world, _ = _dist_info(self.num_replicas, self.rank)
        return {
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "world_size": world,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }


def fit_loop_epoch(trainer: Any) -> int:
    """The epoch ``trainer``'s fit loop is about to run (what it passes to ``set_epoch``); 0 without a trainer."""
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    return int(progress.current.processed) if progress is not None else 0


def _plain(v: Any) -> Any:
    """Lists and tuples compare equal (a checkpoint may hold either)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


class _CountingIterator:
    """Forwards a DataLoader iterator and counts, in the main process, the batches its consumer took."""

    def __init__(self, it: Iterator[Any], loader: ResumableDataLoader) -> None:
        self._it = it
        self._loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self._loader._taken += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str) -> Any:  # only called for names this wrapper lacks
        if name == "_it":
            raise AttributeError(name)
        return getattr(self._it, name)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableBatchSampler` whose position Lightning checkpoints and restores.

    Lightning 2.x saves ``state_dict()`` of every train dataloader that has ``state_dict``/``load_state_dict`` and,
    on a mid-epoch resume, calls ``load_state_dict`` before it creates the epoch's iterator. ``batches`` counts the
    batches taken from this loader's iterator (in the main process, so worker prefetching does not inflate it;
    Lightning's fetcher does not prefetch a sized loader, so that is what the loop consumed). Same arguments as
    ``DataLoader``; ``batch_sampler`` must be a :class:`ResumableBatchSampler` (multi-source or sharded).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(
                "ResumableDataLoader needs a ResumableBatchSampler (MultiSourceBatchSampler, ShardedBatchSampler), "
                f"got {type(self.batch_sampler)}"
            )
        self._taken = 0
        self._iter_base: int | None = None  # the sampler's iter_id when this loader's latest iteration began

    def __iter__(self) -> _CountingIterator:
        self._iter_base = self.batch_sampler.iter_id
        self._taken = 0
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableBatchSampler = self.batch_sampler
        if self._iter_base is not None and sampler.iter_id > self._iter_base:
            # the sampler's running iteration is ours: its epoch, its resume offset plus what the consumer took
            state = sampler.state_dict(batches=sampler.iter_start + self._taken)
            state["epoch"] = sampler.iter_epoch
            return state
        return sampler.state_dict()  # not started yet: a pending resume, or the start of the current epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._iter_base = None
        self._taken = 0
