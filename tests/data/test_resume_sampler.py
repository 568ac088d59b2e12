"""Exact mid-epoch resume of the multi-source batch sampler, its DataLoader, and a Lightning fit resumed from a
checkpoint taken mid-epoch (data order, augmentation and batch_idx equal to an uninterrupted run)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from bmp_lightning.data.samplers import MultiSourceBatchSampler, ResumableDataLoader
from tests.data.resume_helpers import Killed, StopAt, assert_resumes_like_uninterrupted

SIZES = [37, 11, 23]


def _sampler(rank: int = 0, world: int = 2, **kw) -> MultiSourceBatchSampler:
    args = {"batch_size": 6, "source_ratio": [2, 1, 1], "seed": 5, "num_replicas": world, "rank": rank, **kw}
    return MultiSourceBatchSampler(SIZES, **args)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("epoch", [0, 3])
def test_resume_equals_uninterrupted_epoch(shuffle: bool, epoch: int):
    for rank in range(2):
        full = _sampler(rank, shuffle=shuffle)
        full.set_epoch(epoch)
        expected = list(full)
        n = len(expected)
        assert n == len(full) == 6  # ceil(ceil(71 / 2) / 6); streams wrap around their permutations
        for k in [0, 1, 2, 4, n - 1, n]:
            first = _sampler(rank, shuffle=shuffle)
            first.set_epoch(epoch)
            it = iter(first)
            head = [next(it) for _ in range(k)]
            state = first.state_dict()
            assert (state["epoch"], state["batches"]) == (epoch, k)

            seen: list[int] = []
            resumed = _sampler(rank, shuffle=shuffle)  # a fresh process: epoch 0 until the state says otherwise
            resumed.add_epoch_callback(seen.append)
            resumed.load_state_dict(state)
            tail = list(resumed)
            if k < n:
                assert head + tail == expected, (rank, k)
                assert seen == [epoch] and resumed.epoch == epoch
                assert resumed.state_dict()["batches"] == n
            else:  # saved after the last batch: the next epoch starts from its beginning
                assert seen == [epoch + 1]
                nxt = _sampler(rank, shuffle=shuffle)
                nxt.set_epoch(epoch + 1)
                assert tail == list(nxt)


def test_resume_state_roundtrip_before_iterating_and_after_set_epoch():
    s = _sampler()
    s.load_state_dict({**_sampler().state_dict(), "epoch": 2, "batches": 3})
    assert s.state_dict()["batches"] == 3 and s.state_dict()["epoch"] == 2  # pending state is reported as is
    s.set_epoch(2)  # Lightning calls set_epoch with the same epoch after load_state_dict: the resume survives
    assert len(list(s)) == len(s) - 3
    # a resume for an epoch the loop has already left is dropped: the new epoch is complete
    s.load_state_dict({**s.state_dict(), "epoch": 2, "batches": 3})
    s.set_epoch(4)
    assert len(list(s)) == len(s)


def test_mismatch_warns_and_restarts_or_raises(caplog):
    state = _sampler(seed=5).state_dict()
    state.update(epoch=1, batches=2)
    other = MultiSourceBatchSampler([37, 12, 23], batch_size=6, source_ratio=[2, 1, 1], seed=5, num_replicas=2, rank=0)
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.samplers"):
        other.load_state_dict(state)
    assert "source_sizes: checkpoint [37, 11, 23] vs now [37, 12, 23]" in caplog.text
    assert other.epoch == 1 and len(list(other)) == len(other)  # epoch 1 from its first batch
    for kw in ({"num_replicas": 1}, {"batch_size": 8}, {"seed": 6}, {"shuffle": False}):
        strict = _sampler(**kw, strict_resume=True)
        with pytest.raises(ValueError, match="cannot resume the training data order of epoch 1"):
            strict.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        _sampler().load_state_dict({"epoch": 0})


class _Ids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return sum(SIZES)

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_counts_consumed_not_prefetched(num_workers: int):
    """Workers draw index batches ahead; the state holds the batches the consumer actually took."""

    def loader(s: MultiSourceBatchSampler) -> ResumableDataLoader:
        return ResumableDataLoader(
            _Ids(), batch_sampler=s, num_workers=num_workers, prefetch_factor=2 if num_workers else None
        )

    full = [b.tolist() for b in loader(_sampler(1))]
    dl = loader(_sampler(1))
    assert dl.state_dict()["batches"] == 0
    it = iter(dl)
    head = [next(it).tolist() for _ in range(2)]
    state = dl.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 0
    if num_workers:
        assert dl.batch_sampler.state_dict()["batches"] > 2, "the workers ran ahead of the consumer"
    del it
    dl2 = loader(_sampler(1))
    dl2.load_state_dict(state)
    it2 = iter(dl2)
    tail = [b.tolist() for b in it2]
    assert head + tail == full
    assert dl2.state_dict()["batches"] == len(full)  # counts on from the resume point
    with pytest.raises(TypeError, match="MultiSourceBatchSampler"):
        ResumableDataLoader(_Ids(), batch_size=2)


# ------------------------------------------------------------------------------- Lightning end to end
class _Recorder(L.LightningModule):
    """A one-parameter model that records (epoch, batch_idx, instance ids, image checksum) of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, tuple[int, ...], float]] = []

    def training_step(self, batch, batch_idx):
        ids = tuple(batch["idx"].tolist())
        self.seen.append((self.current_epoch, batch_idx, ids, round(float(batch["img"].double().sum()), 3)))
        return (self.w - batch["img"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _datamodule(data_dir: Path, num_workers: int):
    from bmp_lightning.data.datamodule import PoseDataModule

    root = data_dir / "synthetic_smoke"
    sources = [
        {"name": "coco", "ann_file": "annotations/person_keypoints_train.json", "img_dir": "images/train"},
        {"name": "mpii", "reader": "mpii", "ann_file": "annotations/mpii_train.json", "img_dir": "images/train"},
        {"name": "aic", "ann_file": "annotations/aic_train.json", "img_dir": "images/train"},
    ]
    return PoseDataModule(
        train_sources=sources,
        root=str(root),
        batch_size=8,
        num_workers=num_workers,
        input_size=(24, 32),
        heatmap_size=(6, 8),
        seed=3,
    )


def _fit(data_dir: Path, tmp: Path, num_workers: int, ckpt: Path | None = None, stop: StopAt | None = None):
    torch.set_num_threads(1)
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
        callbacks=[stop] if stop else [],
        default_root_dir=tmp,
    )
    try:
        trainer.fit(model, datamodule=_datamodule(data_dir, num_workers), ckpt_path=ckpt)
    except Killed:
        assert stop is not None
    return model.seen, trainer


@pytest.mark.parametrize("num_workers", [0, 1])
def test_lightning_resume_mid_epoch_continues_the_data_order(
    synthetic_pose_data_dir: Path, tmp_path: Path, num_workers
):
    full, trainer = _fit(synthetic_pose_data_dir, tmp_path, num_workers)
    per_epoch = trainer.num_training_batches
    assert per_epoch >= 4 and len(full) == 2 * per_epoch
    assert [b[:2] for b in full] == [(e, i) for e in range(2) for i in range(per_epoch)]
    assert full[:per_epoch] != full[per_epoch:]  # epochs differ in order and augmentation
    # stop mid-epoch 0; after the last batch of epoch 0 (Lightning moves on to epoch 1); in epoch_end (no loader
    # state is loaded then: the datamodule hands the loop's epoch to the fresh sampler); mid-epoch 1
    cases = [(2, False, (0, 2)), (per_epoch, False, (0, per_epoch)), (per_epoch, True, (0, per_epoch))]
    cases.append((per_epoch + 1, False, (1, 1)))
    assert_resumes_like_uninterrupted(
        partial(_fit, synthetic_pose_data_dir, tmp_path, num_workers), full, cases, tmp_path
    )
