"""torch.distributed for the jobs that are not Lightning runs: the BMP evaluation job and the data tools.

Launch them with ``torchrun --nproc_per_node=N -m ...`` (or ``srun`` under SLURM, one task per GPU): the rank, world
size and rendezvous address come from the launcher's environment, read by Lightning's own cluster environments
(``TorchElasticEnvironment`` for torchrun, ``SLURMEnvironment`` for srun). The work list is sharded over the ranks
(:func:`shard`: rank ``r`` takes items ``r, r + N, ...``), every rank works on its share, and rank 0 collects the
results (:meth:`DistContext.gather`). Backend: NCCL on CUDA, gloo on CPU. Started as a single process, everything is
a no-op (world size 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("bmp_lightning")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        return shard(items, self.rank, self.world_size)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks); ``[obj]`` in one process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. its run dir: the ranks' own Hydra timestamps may differ)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (the process's last collective call)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share: items ``rank, rank + world_size, ...`` (strided, so the shares stay balanced when
    image cost drifts along the split). The shares of all ranks partition ``items``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return list(items[rank::world_size])


def launcher_environment():
    """Lightning's cluster environment of this process when it was started by torchrun or srun with more than one
    task; ``None`` for a plain single process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    # an srun step of several tasks (SLURM_STEP_NUM_TASKS is srun's; Lightning's own detect() would also accept a
    # multi-task sbatch script run without srun, whose single process would then wait for ranks that never come)
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return SLURMEnvironment()
    return None


def device_for_rank(device: str, local_rank: int) -> str:
    """``cuda`` -> ``cuda:<local_rank>`` (one GPU per process); an explicit index or ``cpu`` stays."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group of a torchrun / srun launch (NCCL for a CUDA ``device``, else gloo).

    Returns the single-process context when not launched that way. The timeout bounds a collective waiting on a
    rank that died, so a broken job fails instead of hanging.
    """
    import torch
    import torch.distributed as dist

    env = launcher_environment()
    if env is None:
        return DistContext()
    rank, world, local = env.global_rank(), env.world_size(), env.local_rank()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.main_address}:{env.main_port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    log.info("rank %d of %d (local %d, %s, %s)", rank, world, local, backend, type(env).__name__)
    return DistContext(rank, world, local, backend)
