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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from bmp_lightning.utils.common import dist_world


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

    def __init__(self, owner: MultiSourceBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class MultiSourceBatchSampler(Sampler[list[int]]):
    """Batches of global indices into the concatenation of the sources, with fixed per-source counts.

    Args:
        source_sizes: number of samples of each source, in concatenation order.
        batch_size: samples per batch (per device).
        source_ratio: relative share of each source in a batch.
        shuffle: shuffled permutations (else each stream cycles 0..n-1 in order).
        seed: base seed, the same on every rank.
        num_replicas, rank: DDP world size and rank; default: read from torch.distributed at iteration time.
        drop_last: report/yield ``floor`` instead of ``ceil`` batches per epoch.
    """

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
    ) -> None:
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
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.sampler = _EpochHook(self)
        self._epoch_callbacks: list[Callable[[int], None]] = []

    def set_epoch(self, epoch: int) -> None:
        """New seeds for every stream; also tells registered listeners (the dataset's augmentation RNG)."""
        self.epoch = int(epoch)
        for fn in self._epoch_callbacks:
            fn(self.epoch)

    def add_epoch_callback(self, fn: Callable[[int], None]) -> None:
        self._epoch_callbacks.append(fn)

    def __len__(self) -> int:
        world, _ = _dist_info(self.num_replicas, self.rank)
        per_rank = math.ceil(sum(self.source_sizes) / world)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def _stream(self, source: int, world: int, rank: int) -> Iterator[int]:
        """This rank's share of source ``source``'s infinite stream, as global indices."""
        n, offset = self.source_sizes[source], self.offsets[source]
        rng = np.random.default_rng([self.seed, self.epoch, source])
        pos = 0  # position in the (conceptually concatenated) stream of permutations
        while True:
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            # positions pos..pos+n-1 live in this permutation; keep those congruent to rank modulo world
            first = (rank - pos) % world
            for i in perm[first::world].tolist():
                yield i + offset
            pos += n

    def __iter__(self) -> Iterator[list[int]]:
        world, rank = _dist_info(self.num_replicas, self.rank)
        streams = [self._stream(s, world, rank) for s in range(len(self.source_sizes))]
        for _ in range(len(self)):
            batch: list[int] = []
            for stream, count in zip(streams, self.counts):
                batch.extend(next(stream) for _ in range(count))
            yield batch
