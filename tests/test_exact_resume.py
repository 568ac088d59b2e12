"""Exact mid-epoch resume of the configured experiments: the same final weights as an uninterrupted run.

Through the Hydra config and the train entry point (``experiment=smoke``: PoseLitModule + MaskPose tiny,
``experiment=rtmdet_smoke``: InstSegLitModule + RTMDet-Ins-tiny; DataLoader workers on, every checkpoint callback of
the experiment), shrunk to a few seconds: a run stopped mid-epoch by ``+trainer.max_steps`` and resumed with
``ckpt_path=<run>/checkpoints/last.ckpt`` ends bitwise equal to the uninterrupted run; the same after a SIGKILL of a
``python -m bmp_lightning.train`` process. Before the fix, ``configure_optimizers`` built the training loader (through
``trainer.estimated_stepping_batches``) before Lightning restored the checkpoint, so the restored loader state was
never applied and the resumed epoch replayed its first batches.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_run
from tests.test_train import TINY, _run

pytestmark = pytest.mark.usefixtures("one_thread")


# 2 epochs of 6 steps, one DataLoader worker, last.ckpt after every step (and at epoch end, after validation)
POSE = [
    *[o for o in TINY if o != "data.num_workers=0"],
    "data.num_workers=1",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=6",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.rich_progress_bar=null",
]

# RTMDet-Ins-tiny at 128 px, 12 training images in batches of 4 (3 steps per epoch), the stage-2 switch at epoch 1
DET = [
    "experiment=rtmdet_smoke",
    "logger=csv",
    "data.synthetic.n_images=14",
    "data.synthetic.n_val=2",
    "data.input_size=128",
    "data.train_scale=128",
    "data.stage2_scale=128",
    "data.num_workers=1",
    "data.val_batch_size=2",
    "model.warmup_iters=2",
    "model.cosine_begin_epoch=1",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.instseg_pipeline_switch.switch_epoch=1",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.lr_monitor=null",
]


def _cfg(base: list[str], data_dir: Path, run: Path, *extra: str):
    return compose_run("train.yaml", [*base, f"paths.data_dir={data_dir}", f"paths.log_dir={run.parent}", *extra], run)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= 1e-6, f"resumed weights differ from the uninterrupted run's: {worst} by {diff[worst]:.3g}"


def _train(base: list[str], data_dir: Path, run: Path, *extra: str):
    from bmp_lightning.train import train

    _, objs = train(_cfg(base, data_dir, run, *extra))
    return objs["trainer"]


@pytest.fixture(scope="module")
def det_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("det_data")  # the first run generates synthetic_det_smoke there


@pytest.mark.parametrize(
    "base, stop, total",
    [
        pytest.param(POSE, 4, 12, id="smoke-mid-epoch-0"),
        pytest.param(POSE, 8, 12, id="smoke-mid-epoch-1"),
        pytest.param(POSE, 6, 12, id="smoke-epoch-end"),
        pytest.param(DET, 4, 6, id="rtmdet_smoke-mid-epoch-1"),
    ],
)
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(
    base: list[str], stop: int, total: int, synthetic_pose_data_dir: Path, det_data_dir: Path, tmp_path: Path
) -> None:
    data_dir = det_data_dir if base is DET else synthetic_pose_data_dir
    full = _train(base, data_dir, tmp_path / "full")
    assert full.global_step == total

    stopped = _train(base, data_dir, tmp_path / "stopped", f"+trainer.max_steps={stop}")
    assert stopped.global_step == stop
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    per_epoch = total // full.max_epochs
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    epoch, batches = divmod(stop, per_epoch) if stop % per_epoch else (stop // per_epoch - 1, per_epoch)
    assert (ckpt["global_step"], loader_state["epoch"], loader_state["batches"]) == (
        stop,
        epoch,
        batches,
    ), "last.ckpt of the stopped run is its mid-epoch state"

    resumed = _train(base, data_dir, tmp_path / "resumed", f"ckpt_path={last}")
    assert resumed.global_step == total
    assert_same_weights(
        _weights(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
    )


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """A real ``python -m bmp_lightning.train`` process is SIGKILLed at step 5 (last.ckpt: step 4, mid-epoch 0)."""
    data = synthetic_pose_data_dir
    every2 = "callbacks.last_checkpoint.every_n_train_steps=2"
    killed = _run(
        [
            "bmp_lightning.train",
            *POSE,
            every2,
            f"paths.data_dir={data}",
            f"paths.log_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'killed'}",
            "+callbacks.kill._target_=tests.test_train.KillAtStep",
            "+callbacks.kill.step=5",
        ],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4

    _train(POSE, data, tmp_path / "full", every2)
    resumed = _train(POSE, data, tmp_path / "resumed", every2, f"ckpt_path={last}")
    assert resumed.global_step == 12
    assert_same_weights(
        _weights(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
    )


def test_a_loader_built_before_the_restore_fails_loudly(
    synthetic_pose_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The old cause, re-introduced: ``estimated_stepping_batches`` in ``configure_optimizers`` builds the loader before
    the checkpoint is restored. The resume must stop with an error instead of replaying the epoch's first batches."""
    import bmp_lightning.models.pose_module as pose_module

    def old_estimate(trainer) -> int:
        return max(1, int(trainer.estimated_stepping_batches // max(1, trainer.max_epochs)))

    data = synthetic_pose_data_dir
    _train(POSE, data, tmp_path / "stopped", "+trainer.max_steps=4")
    monkeypatch.setattr(pose_module, "train_steps_per_epoch", old_estimate)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    with pytest.raises(RuntimeError, match="training-data position was not applied"):
        _train(POSE, data, tmp_path / "resumed", f"ckpt_path={last}")
