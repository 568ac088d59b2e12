"""Logging for many runs: W&B online iff credentials exist, one run name per multirun job in a shared group, and the
detector's GT | prediction pictures (DetectionVisualizer) in vis/ and W&B. Everything runs offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bmp_lightning.utils.loggers import run_name, wandb_credentials, wandb_logger

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc of the machine
    return tmp_path


def test_wandb_credentials(no_wandb_env, monkeypatch) -> None:
    assert not wandb_credentials()
    netrc = no_wandb_env / "netrc"
    netrc.write_text("machine example.org login u password p\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_credentials(), "another host's entry is no W&B login"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")  # what `wandb login` writes
    assert wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.my-lab.org")
    assert not wandb_credentials(), "a self-hosted server needs its own entry"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials()


def test_wandb_logger_online_only_with_credentials(no_wandb_env, monkeypatch) -> None:
    off = wandb_logger("smoke", save_dir=str(no_wandb_env), project="p", group="smoke")
    assert off._offline is True and off._wandb_init["name"] == "smoke"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    on = wandb_logger("smoke", save_dir=str(no_wandb_env), project="p", group="smoke")
    assert on._offline is False
    assert wandb_logger("smoke", offline=True, save_dir=str(no_wandb_env))._offline is True, "explicit wins"


def test_run_name() -> None:
    assert run_name("smoke") == "smoke"
    overrides = ["experiment=smoke", "data.mask_alpha=0.5", "seed=2", "paths.data_dir=/x", "hydra.sweep.dir=/y"]
    assert run_name("smoke", 3, overrides) == "smoke-3-data.mask_alpha=0.5,seed=2"
    assert run_name("smoke", 0, ["experiment=smoke"]) == "smoke-0"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_multirun_jobs_get_their_own_wandb_run_names(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    from tests.test_train import TINY

    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith(("logger=", "callbacks."))]
    _run([
        "bmp_lightning.train", "-m", *tiny, "logger=wandb", "seed=1,2", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "callbacks=none",
        f"paths.data_dir={synthetic_pose_data_dir}", f"hydra.sweep.dir={sweep}",
    ])  # fmt: skip
    names = []
    for job, seed in (("0", "1"), ("1", "2")):
        found = re.findall(r"W&B: offline run '([^']+)' \(group smoke\)", (sweep / job / "train.log").read_text())
        assert len(found) == 1
        name = found[0]
        # experiment, job number, the job's overrides in command-line order (its own seed among them)
        assert name.startswith(f"smoke-{job}-model.input_size=[48,64],") and f",seed={seed}," in name, name
        assert "paths." not in name and "hydra." not in name and "experiment=" not in name
        runs = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        data = runs[0].read_bytes()
        assert name.encode() in data and b"smoke" in data, "name and group are in the W&B run record"
        names.append(name)
    assert names[0] != names[1]


def test_detector_logs_prediction_pictures(cfg_train, tmp_path: Path) -> None:
    """A 1-step fit of the detector smoke experiment draws GT | prediction pairs into vis/ and the W&B run."""
    from bmp_lightning.train import train

    out = tmp_path / "run"
    cfg = cfg_train(
        "experiment=rtmdet_smoke", "logger=many_loggers", "data.synthetic.n_images=6", "data.synthetic.n_val=2",
        "data.input_size=128", "data.train_scale=128", "data.stage2_scale=128", "data.num_workers=0",
        "data.batch_size=2", "data.val_batch_size=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
        "trainer.check_val_every_n_epoch=1", "callbacks.rich_progress_bar=null", "callbacks.lr_monitor=null",
        "callbacks.visualizer.score_thr=0.0", "model.max_per_img=3", out_dir=out,
    )  # fmt: skip
    _, objs = train(cfg)
    vis = [cb for cb in objs["trainer"].callbacks if type(cb).__name__ == "DetectionVisualizer"]
    assert len(vis) == 1 and [p.name for p in vis[0].saved] == ["epoch_000_step_000001.png"]
    img = cv2.imread(str(vis[0].saved[0]))
    # 2 validation images, one row of 2 pairs: each pair is GT (128 wide) | 2 px | prediction (128 wide)
    assert img.shape[1] == 2 + 2 * (128 + 2 + 128 + 2) and img.shape[0] <= 2 + 128 + 2
    left, right = img[2:-2, 2:130], img[2:-2, 132:260]
    assert not np.array_equal(left, right), "GT and prediction panels differ"
    assert list((out / "wandb").glob("offline-run-*/files/media/images/val/vis_*.png")), "no W&B image logged"
