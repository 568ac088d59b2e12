"""GPU-run DataLoader defaults of PoseDataModule: workers from the CPUs per device, persistent workers, prefetching,
pinned memory, and the start-up warning when the workers cannot feed the model's samples/s per device."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytest

from bmp_lightning.data.datamodule import cpus_available, default_num_workers

CONF = Path(__file__).resolve().parents[2] / "conf"


def _dm(sample_data_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=None,
            overrides=["+paths=default", "+data=sample", f"paths.shared_dir={sample_data_dir.parent}", *overrides],
        )
    return hydra.utils.instantiate(cfg.data)


@pytest.mark.parametrize(
    ("cpus", "devices", "expected"),
    [(16, 4, 3), (64, 8, 7), (96, 4, 16), (2, 1, 1), (3, 4, 0), (128, 1, 16)],
)
def test_default_num_workers(cpus: int, devices: int, expected: int):
    assert default_num_workers(devices, cpus=cpus) == expected


def test_base_config_defaults_suit_gpu_runs():
    from omegaconf import OmegaConf

    base = OmegaConf.load(CONF / "data" / "base.yaml")
    assert base.num_workers is None and base.persistent_workers and base.pin_memory and base.prefetch_factor == 4
    assert base.normalize is False  # uint8 crops, normalised on the device
    for exp in ("vitpose_b", "maskpose_b"):
        assert OmegaConf.load(CONF / "experiment" / f"{exp}.yaml").data.gpu_samples_per_s == 330


def test_unset_workers_follow_the_cpus_and_loaders_keep_them(sample_data_dir: Path):
    dm = _dm(sample_data_dir, "data.num_workers=null")
    assert dm.num_workers == default_num_workers(1, cpus=cpus_available())
    dm.num_workers = 1  # an explicit count wins
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and loader.prefetch_factor == 4
    (vloader,) = dm.val_dataloader()
    assert vloader.persistent_workers and vloader.prefetch_factor == 4
    batch = next(iter(loader))
    assert batch["img"].shape == (6, 3, 256, 192)
    dm.num_workers = 0  # the main process loads: no worker options
    assert not dm.train_dataloader().persistent_workers


def test_feed_check_warns_when_workers_cannot_keep_up(sample_data_dir: Path, caplog):
    dm = _dm(sample_data_dir, "data.num_workers=2", "data.gpu_samples_per_s=1e9", "data.feed_check=true")
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.datamodule"):
        dm.train_dataloader()
    assert dm.feed_rate is not None and dm.feed_rate > 0
    msg = [r.getMessage() for r in caplog.records if "cannot feed the GPUs" in r.getMessage()]
    assert len(msg) == 1 and "2 workers" in msg[0] and "data.num_workers" in msg[0]

    caplog.clear()
    ok = _dm(sample_data_dir, "data.num_workers=2", "data.gpu_samples_per_s=1", "data.feed_check=true")
    ok.setup("fit")
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.datamodule"):
        assert ok.check_feed_rate() == pytest.approx(2 * ok.feed_rate)
    assert not [r for r in caplog.records if "cannot feed" in r.getMessage()]

    off = _dm(sample_data_dir, "data.gpu_samples_per_s=1e9")  # no trainer on a GPU: not measured
    off.setup("fit")
    off.train_dataloader()
    assert off.feed_rate is None
