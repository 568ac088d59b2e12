"""Gathering predictions across ranks and removing the DDP padding repeats."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bmp_lightning.metrics.gather import deduplicate, gather_predictions


def test_identity_without_process_group():
    preds = [{"instance_id": 1}, {"instance_id": 2}]
    assert gather_predictions(iter(preds)) == preds


def test_deduplicate_keeps_first_and_unkeyed():
    preds = [
        {"instance_id": 1, "v": "a"},
        {"instance_id": np.int64(2), "v": "b"},
        {"instance_id": 1, "v": "dup"},
        {"instance_id": torch.tensor(2), "v": "dup"},
        {"instance_id": None, "v": "x"},
        {"v": "y"},
        {"instance_id": None, "v": "x"},
    ]
    assert [p["v"] for p in deduplicate(preds)] == ["a", "b", "x", "y", "x"]
    assert [p["v"] for p in deduplicate(preds, key="v")] == ["a", "b", "dup", "x", "y"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # a DistributedSampler over 5 items on 2 ranks pads rank 1 with item 0
        local = [{"instance_id": i, "rank": rank} for i in ([0, 2, 4] if rank == 0 else [1, 3, 0])]
        gathered = gather_predictions(local)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_gather(tmp_path):
    out = str(tmp_path / "gathered.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    gathered = torch.load(out, weights_only=False)
    assert [p["instance_id"] for p in gathered] == [0, 2, 4, 1, 3, 0]
    assert sorted(p["instance_id"] for p in deduplicate(gathered)) == [0, 1, 2, 3, 4]
