from __future__ import annotations

import math

import numpy as np
import pytest

from bmp_lightning.data.samplers import MultiSourceBatchSampler, per_source_counts


def _source_of(idx: int, sizes: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), idx, side="right"))


def test_bmp_counts_22_21_21():
    assert per_source_counts(64, [1, 1, 1]) == [22, 21, 21]
    assert per_source_counts(64, [2, 1, 1]) == [32, 16, 16]
    assert per_source_counts(10, [1, 3]) == [3, 7]  # int(7.5) = 7 for the second, remainder to the first
    with pytest.raises(ValueError):
        per_source_counts(64, [0, 0])


def test_every_batch_has_the_configured_shares():
    sizes = [150, 22, 378]
    sampler = MultiSourceBatchSampler(sizes, batch_size=64, source_ratio=[1, 1, 1], seed=3, num_replicas=1, rank=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(550 / 64) == 9
    for batch in batches:
        assert len(batch) == 64
        counts = np.bincount([_source_of(i, sizes) for i in batch], minlength=3)
        assert counts.tolist() == [22, 21, 21]
        assert all(0 <= i < 550 for i in batch)
    # the small source (22) is cycled: 9 batches x 21 draws = 189 draws, every index at least 8 times
    mpii = [i for b in batches for i in b if 150 <= i < 172]
    assert np.bincount(np.array(mpii) - 150, minlength=22).min() >= 8


def test_first_permutation_is_a_permutation():
    sizes = [44, 42, 42]
    sampler = MultiSourceBatchSampler(sizes, batch_size=64, source_ratio=[1, 1, 1], seed=0, num_replicas=1, rank=0)
    batches = list(sampler)  # 2 batches: 44 + 42 + 42 draws = exactly one permutation per source
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(128))


def test_ranks_are_disjoint_and_cover_the_data():
    sizes = [120, 120, 120]
    per_rank = []
    for rank in range(2):
        s = MultiSourceBatchSampler(sizes, batch_size=12, source_ratio=[1, 1, 1], seed=7, num_replicas=2, rank=rank)
        assert len(s) == math.ceil(math.ceil(360 / 2) / 12) == 15
        per_rank.append([i for b in s for i in b])
    a, b = per_rank
    assert len(a) == len(b) == 180
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(360))


def test_epochs_differ_and_seed_repeats():
    sizes = [50, 30]
    s1 = MultiSourceBatchSampler(sizes, batch_size=8, source_ratio=[1, 1], seed=5, num_replicas=1, rank=0)
    s2 = MultiSourceBatchSampler(sizes, batch_size=8, source_ratio=[1, 1], seed=5, num_replicas=1, rank=0)
    assert list(s1) == list(s2)
    e0 = list(s1)
    s1.set_epoch(1)
    e1 = list(s1)
    assert e0 != e1
    s2.set_epoch(1)
    assert list(s2) == e1
    s3 = MultiSourceBatchSampler(sizes, batch_size=8, source_ratio=[1, 1], seed=6, num_replicas=1, rank=0)
    assert list(s3) != e0


def test_lightning_epoch_hook_and_callbacks():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    seen = []
    s = MultiSourceBatchSampler([10, 10], batch_size=4, seed=0, num_replicas=1, rank=0)
    s.add_epoch_callback(seen.append)
    loader = DataLoader(list(range(20)), batch_sampler=s)
    _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls at every epoch start
    assert s.epoch == 3 and seen == [3]


def test_no_shuffle_and_drop_last():
    s = MultiSourceBatchSampler([6, 4], batch_size=4, source_ratio=[1, 1], shuffle=False, num_replicas=1, rank=0)
    assert list(s) == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 6, 7]]
    s.drop_last = True
    assert len(s) == 2 and len(list(s)) == 2


def test_bad_configs():
    with pytest.raises(ValueError):
        MultiSourceBatchSampler([10, 0], batch_size=4, source_ratio=[1, 1])
    with pytest.raises(ValueError):
        MultiSourceBatchSampler([10, 10], batch_size=4, source_ratio=[1, 1, 1])
    # a zero ratio may point at an empty source
    s = MultiSourceBatchSampler([10, 0], batch_size=4, source_ratio=[1, 0], num_replicas=1, rank=0)
    assert all(i < 10 for b in s for i in b)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = MultiSourceBatchSampler([40, 20], batch_size=6, source_ratio=[2, 1], seed=1)  # rank/world from dist
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"len": len(s), "batches": list(s)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reads_rank_from_torch_distributed(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["len"] == res[1]["len"] == math.ceil(30 / 6) == 5
    flat = [[i for b in r["batches"] for i in b] for r in res]
    # 5 batches x (4 of source 0 + 2 of source 1) per rank: 40 + 20 draws in all = one permutation per source
    assert not set(flat[0]) & set(flat[1]) and sorted(flat[0] + flat[1]) == list(range(60))
