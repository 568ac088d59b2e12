"""Exact mid-epoch resume of the instance-segmentation training data: ShardedBatchSampler (DistributedSampler order,
resumable), its ResumableDataLoader, and a Lightning fit of InstSegDataModule resumed from a mid-epoch checkpoint
(data order, augmentation, stage-2 switch and batch_idx equal to an uninterrupted run)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from bmp_lightning.data.instseg_datamodule import InstSegDataModule, InstSegPipelineSwitch
from bmp_lightning.data.samplers import ResumableDataLoader, ShardedBatchSampler
from tests.data.resume_helpers import Killed, StopAt, assert_resumes_like_uninterrupted

N = 23  # 12 per rank of 2 (one padded), batches of 5: [5, 5, 2]


def _sampler(rank: int = 0, world: int = 2, **kw) -> ShardedBatchSampler:
    args = {"batch_size": 5, "seed": 7, "num_replicas": world, "rank": rank, **kw}
    return ShardedBatchSampler(N, **args)


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n: int = N) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("n, world, shuffle", [(23, 2, True), (23, 2, False), (2, 5, True), (10, 1, True)])
def test_same_batches_as_a_distributed_sampler_loader(n: int, world: int, shuffle: bool):
    """The order of the loader it replaces: DataLoader(batch_size, sampler=DistributedSampler(...)), every epoch."""
    for epoch in (0, 4):
        for rank in range(world):
            ref = DistributedSampler(_Ids(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=7)
            ref.set_epoch(epoch)
            expected = [b.tolist() for b in DataLoader(_Ids(n), batch_size=5, sampler=ref)]
            ours = ShardedBatchSampler(n, 5, shuffle=shuffle, seed=7, num_replicas=world, rank=rank)
            ours.set_epoch(epoch)
            assert list(ours) == expected and len(ours) == len(expected)
    assert len(_sampler(drop_last=True)) == 2 and [len(b) for b in _sampler()] == [5, 5, 2]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("epoch", [0, 3])
def test_resume_equals_uninterrupted_epoch(shuffle: bool, epoch: int):
    for rank in range(2):  # two simulated ranks: disjoint halves of one permutation (plus one padded index)
        full = _sampler(rank, shuffle=shuffle)
        full.set_epoch(epoch)
        expected = list(full)
        n = len(expected)
        assert n == 3
        for k in range(n + 1):
            first = _sampler(rank, shuffle=shuffle)
            first.set_epoch(epoch)
            it = iter(first)
            head = [next(it) for _ in range(k)]
            state = first.state_dict()
            assert (state["epoch"], state["batches"], state["dataset_size"]) == (epoch, k, N)

            seen: list[int] = []
            resumed = _sampler(rank, shuffle=shuffle)  # a fresh process: epoch 0 until the state says otherwise
            resumed.add_epoch_callback(seen.append)
            resumed.load_state_dict(state)
            tail = list(resumed)
            if k < n:
                assert head + tail == expected, (rank, k)
                assert seen == [epoch] and resumed.state_dict()["batches"] == n
            else:  # saved after the last batch: the next epoch from its beginning
                nxt = _sampler(rank, shuffle=shuffle)
                nxt.set_epoch(epoch + 1)
                assert seen == [epoch + 1] and tail == list(nxt)
    both = [i for r in range(2) for b in _sampler(r) for i in b]
    assert sorted(set(both)) == list(range(N)) and len(both) == N + 1  # DistributedSampler pads one index


def test_mismatch_warns_and_restarts_or_raises(caplog):
    state = {**_sampler().state_dict(), "epoch": 2, "batches": 1}
    other = ShardedBatchSampler(N + 1, 5, seed=7, num_replicas=2, rank=0)
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.samplers"):
        other.load_state_dict(state)
    assert "dataset_size: checkpoint 23 vs now 24" in caplog.text
    assert other.epoch == 2 and len(list(other)) == len(other)  # epoch 2 from its first batch
    for kw in ({"num_replicas": 1}, {"batch_size": 4}, {"seed": 8}, {"shuffle": False}, {"drop_last": True}):
        with pytest.raises(ValueError, match="cannot resume the training data order of epoch 2"):
            _sampler(**kw, strict_resume=True).load_state_dict(state)
    with pytest.raises(ValueError, match="not a ShardedBatchSampler state_dict"):
        _sampler().load_state_dict({"epoch": 0, "batches": 0})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_counts_consumed_not_prefetched(num_workers: int):
    def loader(s: ShardedBatchSampler) -> ResumableDataLoader:
        return ResumableDataLoader(_Ids(), batch_sampler=s, num_workers=num_workers)

    full = [b.tolist() for b in loader(_sampler(1, batch_size=2))]
    dl = loader(_sampler(1, batch_size=2))
    it = iter(dl)
    head = [next(it).tolist() for _ in range(2)]
    state = dl.state_dict()
    assert (state["epoch"], state["batches"], state["num_batches"]) == (0, 2, 6)
    del it
    dl2 = loader(_sampler(1, batch_size=2))
    dl2.load_state_dict(state)
    assert head + [b.tolist() for b in dl2] == full


# ------------------------------------------------------------------------------- Lightning end to end
SIZE = 64


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bmp_lightning.data.synthetic import generate

    root = tmp_path_factory.mktemp("instseg_resume")
    generate(root, n_images=10, n_val=1, seed=2, image_size=(SIZE, 80), min_visible_px=30)
    return root


class _Recorder(L.LightningModule):
    """One parameter; records (epoch, batch_idx, image ids, pipeline stage, image checksum) of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        ids = tuple(m["image_id"] for m in batch["meta"])
        stage = self.trainer.datamodule.train_dataset.stage
        n_inst = tuple(len(t["labels"]) for t in batch["targets"])
        checksum = round(float(batch["img"].double().sum()), 3)
        self.seen.append((self.current_epoch, batch_idx, ids, stage, n_inst, checksum))
        return (self.w - batch["img"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, tmp: Path, num_workers: int, ckpt: Path | None = None, stop: StopAt | None = None):
    torch.set_num_threads(1)
    dm = InstSegDataModule(
        train_ann="annotations/instances_train.json",
        train_img_dir="images/train",
        root=str(root),
        batch_size=2,
        num_workers=num_workers,
        pin_memory=False,
        input_size=SIZE,
        train_scale=SIZE,
        stage2_scale=SIZE,
        ratio_range=(0.5, 1.5),
        remove_prob=1.0,  # stage 1 blacks out instances, stage 2 does not: the stage shows in the pixels
        seed=4,
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[InstSegPipelineSwitch(switch_epoch=1)] + ([stop] if stop else []),
        default_root_dir=tmp,
    )
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    except Killed:
        assert stop is not None
    return model.seen, trainer


@pytest.mark.parametrize("num_workers", [0, 1])
def test_lightning_resume_mid_epoch_continues_order_augmentation_and_stage(
    syn_root: Path, tmp_path: Path, num_workers: int
):
    full, trainer = _fit(syn_root, tmp_path, num_workers)
    per_epoch = trainer.num_training_batches
    assert per_epoch == 5  # 9 training images, batches of 2 (the last one partial)
    assert [b[:2] for b in full] == [(e, i) for e in range(2) for i in range(per_epoch)]
    assert [b[3] for b in full] == [1] * per_epoch + [2] * per_epoch  # the stage-2 switch at epoch 1
    assert sorted(i for b in full[:per_epoch] for i in b[2]) == list(range(1, 10))  # every image once per epoch
    assert [b[2] for b in full[:per_epoch]] != [b[2] for b in full[per_epoch:]]  # reshuffled per epoch
    # stop mid-epoch 0; after its last batch; in its epoch_end; mid-epoch 1 (stage 2, where Lightning skips
    # on_train_epoch_start on the resume)
    cases = [(2, False, (0, 2)), (per_epoch, False, (0, per_epoch)), (per_epoch, True, (0, per_epoch))]
    cases.append((per_epoch + 2, False, (1, 2)))
    assert_resumes_like_uninterrupted(partial(_fit, syn_root, tmp_path, num_workers), full, cases, tmp_path)
