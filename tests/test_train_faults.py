"""Training faults through the configured entry points: a diverging run, wrongly typed config values, truncated,
empty or unsafe checkpoint files, leftover temporary checkpoint files, and json that must stay valid.

Each is one of: a clear one-line error naming the key / file / step (non-zero exit at the command line), an opt-in
counted skip that reaches ``metrics.json``, or correct behaviour.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import compose_run
from tests.test_train import ROOT, TINY, _run

pytestmark = pytest.mark.usefixtures("one_thread")


# 2 epochs of 4 steps, a checkpoint after every step
SHORT = [
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.rich_progress_bar=null",
]
DET = [
    "experiment=rtmdet_smoke",
    "logger=csv",
    "data.synthetic.n_images=10",
    "data.synthetic.n_val=2",
    "data.input_size=128",
    "data.train_scale=128",
    "data.stage2_scale=128",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "+trainer.num_sanity_val_steps=0",
    "+trainer.limit_val_batches=1",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.lr_monitor=null",
]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m <args>`` as a user runs it (no HYDRA_FULL_ERROR)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _pose_cfg(data_dir: Path, run: Path, *extra: str):
    return compose_run(
        "train.yaml", [*TINY, *SHORT, f"paths.data_dir={data_dir}", f"paths.log_dir={run.parent}", *extra], run
    )


def _strict_json(path: Path):
    def refuse(name: str):
        raise ValueError(f"{path} is not valid JSON: bare {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _all_finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class Evil:
    """A class a checkpoint should never make us import."""


class PoisonSteps(L.Callback):
    """Test-only fault injection: NaN input images at the given global steps; records whether the weights moved."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.moved: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]
        if trainer.global_step in self.steps:
            # crops may arrive as uint8 (normalised on the device); a float NaN image stands in for a poisoned batch
            batch["img"] = torch.full(batch["img"].shape, float("nan"), device=batch["img"].device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        after = list(pl_module.parameters())
        self.moved[step] = any(not torch.equal(a, b) for a, b in zip(self._before, after))


# ----------------------------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("experiment", ["smoke", "rtmdet_smoke"])
def test_diverging_run_stops_naming_step_and_last_finite_checkpoint(
    experiment: str, synthetic_pose_data_dir: Path, tmp_path: Path
) -> None:
    """``model.lr=1e10``: it used to finish, save NaN weights as last/best and write bare NaN in metrics.json."""
    from bmp_lightning.train import train
    from bmp_lightning.utils.fit_guard import NonFiniteLossError

    run = tmp_path / "run"
    if experiment == "smoke":
        cfg = _pose_cfg(synthetic_pose_data_dir, run, "model.lr=1e10")
    else:
        paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path}"]
        cfg = compose_run("train.yaml", [*DET, *paths, "model.lr=1e10", "model.warmup_iters=1"], run)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    msg = str(err.value)
    assert "non-finite training loss" in msg and "at epoch 0, step " in msg
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts, "a checkpoint was written before the divergence"
    assert f"last checkpoint (finite weights): {run / 'checkpoints' / 'last.ckpt'}" in msg
    for ckpt in ckpts:
        assert _all_finite(ckpt), f"{ckpt.name} holds non-finite weights"
    assert not (run / "metrics.json").exists(), "a failed run writes no metrics"


def test_diverging_run_exits_nonzero_with_one_line(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    proc = _cli(
        [
            "bmp_lightning.train",
            *TINY,
            *SHORT,
            "model.lr=1e10",
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [ln for ln in out.splitlines() if "non-finite training loss" in ln]
    assert len(errors) == 1 and "last checkpoint (finite weights):" in errors[0], out[-3000:]
    assert "Traceback" not in out


def test_tolerated_nonfinite_steps_are_skipped_counted_and_reported(synthetic_pose_data_dir: Path, tmp_path: Path):
    """``model.max_nonfinite_steps=2``: two NaN steps are skipped (weights unchanged), counted in metrics.json."""
    from bmp_lightning.train import train
    from bmp_lightning.utils.fit_guard import NonFiniteLossError

    def poisoned(run: Path, steps: str):
        poison = ["+callbacks.poison._target_=tests.test_train_faults.PoisonSteps", f"+callbacks.poison.steps={steps}"]
        return _pose_cfg(synthetic_pose_data_dir, run, "model.max_nonfinite_steps=2", *poison)

    run = tmp_path / "run"
    metrics, objs = train(poisoned(run, "[1,5]"))
    trainer = objs["trainer"]
    poison = next(cb for cb in trainer.callbacks if isinstance(cb, PoisonSteps))
    assert trainer.global_step == 8
    assert poison.moved[1] is False and poison.moved[5] is False, "a skipped step must not change the weights"
    assert poison.moved[0] and poison.moved[2] and poison.moved[6], "the other steps train"
    saved = _strict_json(run / "metrics.json")
    assert saved["train/nonfinite_steps"] == 2.0 and math.isfinite(saved["train/loss_epoch"])
    assert _all_finite(run / "checkpoints" / "last.ckpt")

    # a third non-finite step is one too many
    with pytest.raises(NonFiniteLossError, match=r"at epoch 0, step 3 .*\(used up: 2\)"):
        train(poisoned(tmp_path / "run2", "[1,2,3]"))


class PoisonWeights(L.Callback):
    """Test-only: a NaN in one weight after the optimizer step of ``step`` (before the checkpoint callbacks run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_diverged_weights_are_not_saved_by_the_run(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """Weights that turn NaN while the loss was still finite: the step's checkpoint is refused, last.ckpt stays."""
    from bmp_lightning.train import train
    from bmp_lightning.utils.fit_guard import NonFiniteWeightsError

    run = tmp_path / "run"
    poison = ["+callbacks.poison._target_=tests.test_train_faults.PoisonWeights", "+callbacks.poison.step=3"]
    with pytest.raises(NonFiniteWeightsError) as err:
        train(_pose_cfg(synthetic_pose_data_dir, run, *poison))
    last = run / "checkpoints" / "last.ckpt"
    assert "non-finite weights in net." in str(err.value) and "at epoch 0, step 3" in str(err.value)
    assert f"last checkpoint (finite weights): {last}" in str(err.value)
    assert _all_finite(last) and torch.load(last, weights_only=True)["global_step"] == 2


def test_nonfinite_weights_are_never_written(tmp_path: Path) -> None:
    from bmp_lightning.utils.checkpoint_io import AtomicCheckpointIO
    from bmp_lightning.utils.fit_guard import NonFiniteWeightsError

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "global_step": 3, "state_dict": {"w": torch.ones(3)}}, path)
    bad = {"epoch": 1, "global_step": 7, "state_dict": {"net.w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(NonFiniteWeightsError, match=r"last.ckpt: non-finite weights in net.w at epoch 1, step 7"):
        io.save_checkpoint(bad, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3, "the finite checkpoint stays"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_every_json_written_is_valid(tmp_path: Path) -> None:
    from bmp_lightning.structures.files import atomic_write_json, to_json

    obj = {
        "ap": float("nan"),
        "inf": [float("inf"), -float("inf"), 1.5],
        "np": np.float32("nan"),
        "arr": np.array([1.0, np.nan]),
        "t": torch.tensor([2.0, float("nan")]),
        "n": 3,
    }
    want = {"ap": None, "inf": [None, None, 1.5], "np": None, "arr": [1.0, None], "t": [2.0, None], "n": 3}
    assert _strict_json(atomic_write_json(tmp_path / "metrics.json", obj)) == want
    assert _strict_json(atomic_write_json(tmp_path / "results.json", obj, indent=None)) == want
    assert json.loads(to_json(obj)) == want


# ----------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected int or None"),
        ("model.lr=fast", "model.lr='fast': expected float"),
        ("data.batch_size=1.5", "data.batch_size=1.5: expected int"),
        ("model.flip_test=maybe", "model.flip_test='maybe': expected bool"),
    ],
)
def test_wrongly_typed_config_value_names_key_and_type(
    override: str, message: str, synthetic_pose_data_dir: Path, tmp_path: Path
) -> None:
    from bmp_lightning.structures.errors import ConfigError
    from bmp_lightning.train import train

    with pytest.raises(ConfigError) as err:
        train(_pose_cfg(synthetic_pose_data_dir, tmp_path / "run", override))
    assert str(err.value) == message


def test_every_experiment_config_passes_the_type_check(tmp_path: Path) -> None:
    """No false alarm on the shipped configs (train and eval composition of every experiment)."""
    from bmp_lightning.utils.config_check import check_entry_config

    for exp in sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")):
        for name in ("train.yaml", "eval.yaml"):
            check_entry_config(compose_run(name, [f"experiment={exp}"], tmp_path))


def test_cli_config_error_is_one_line_and_nonzero(tmp_path: Path) -> None:
    args = ["bmp_lightning.train", "experiment=smoke", "trainer.max_epochs=abc", f"hydra.run.dir={tmp_path}"]
    proc = _cli(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "trainer.max_epochs='abc': expected int or None" in out and "Traceback" not in out, out[-3000:]


def test_exit_on_user_error_keeps_the_exception_for_hydra_full_error(monkeypatch) -> None:
    from bmp_lightning.structures.errors import ConfigError
    from bmp_lightning.utils.run import exit_on_user_error

    @exit_on_user_error
    def main(cfg):
        raise ConfigError("x.y='a': expected int")

    @exit_on_user_error
    def crash(cfg):
        raise ZeroDivisionError  # not a user error: Hydra's report with its traceback

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as err:
        main(None)
    assert err.value.code == 1
    with pytest.raises(ZeroDivisionError):
        crash(None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        main(None)


# ----------------------------------------------------------------------------------------------- checkpoint files
@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    files = {"truncated": tmp_path / "truncated.ckpt", "empty": tmp_path / "empty.pth", "text": tmp_path / "notes.pth"}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": Evil()}, tmp_path / "evil.ckpt")
    files["evil"] = tmp_path / "evil.ckpt"
    return files


def test_truncated_or_unsafe_resume_checkpoint_is_one_clear_error(
    bad_files: dict[str, Path], synthetic_pose_data_dir: Path, tmp_path: Path
) -> None:
    from bmp_lightning.structures.errors import CheckpointError, UnsafeCheckpointError
    from bmp_lightning.train import train

    for kind in ("truncated", "empty", "text"):
        path = bad_files[kind]
        with pytest.raises(CheckpointError, match=f"{path}: .*truncated or not a checkpoint"):
            train(_pose_cfg(synthetic_pose_data_dir, tmp_path / kind, f"ckpt_path={path}"))
    with pytest.raises(UnsafeCheckpointError, match=r"evil.ckpt: refusing .* references: tests.test_train_faults.Evil"):
        train(_pose_cfg(synthetic_pose_data_dir, tmp_path / "evil", f"ckpt_path={bad_files['evil']}"))


def test_truncated_weights_in_every_loader_name_the_file(bad_files: dict[str, Path], synthetic_pose_data_dir, tmp_path):
    from bmp_lightning import PoseEstimator
    from bmp_lightning.convert import main as convert
    from bmp_lightning.detector import Detector
    from bmp_lightning.structures.errors import CheckpointError
    from bmp_lightning.train import train

    for kind in ("truncated", "empty"):
        path = bad_files[kind]
        pattern = f"{path}: .*truncated or not a checkpoint"
        with pytest.raises(CheckpointError, match=pattern):
            PoseEstimator.from_checkpoint(path)
        with pytest.raises(CheckpointError, match=pattern):
            Detector.from_checkpoint(path)
        with pytest.raises(SystemExit, match=pattern):
            convert([f"src={path}", f"out={tmp_path / 'out.pth'}"])
        with pytest.raises(Exception) as err:  # Hydra wraps the module's error; the entry point finds it
            train(_pose_cfg(synthetic_pose_data_dir, tmp_path / kind, f"model.init_weights={path}"))
        from bmp_lightning.structures.errors import find_user_error

        assert isinstance(find_user_error(err.value), CheckpointError) and str(path) in str(find_user_error(err.value))


def test_cli_truncated_checkpoint_is_one_line_and_nonzero(bad_files: dict[str, Path], tmp_path: Path) -> None:
    path = bad_files["truncated"]
    proc = _cli(["bmp_lightning.train", "experiment=smoke", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'r'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"{path}: truncated or not a checkpoint" in out and "Traceback" not in out, out[-3000:]


def test_pose_estimator_refuses_arbitrary_classes_unless_allowed(tmp_path: Path) -> None:
    from bmp_lightning import PoseEstimator
    from bmp_lightning.models.components.pose_net import vitpose_tiny
    from bmp_lightning.structures.errors import UnsafeCheckpointError

    net = vitpose_tiny(num_keypoints=21, embed_dim=32, depth=1, num_heads=2, deconv_channels=[16, 16])
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": net.state_dict(), "evil": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pth: refusing .*tests.test_train_faults.Evil"):
        PoseEstimator.from_checkpoint(path)
    est = PoseEstimator.from_checkpoint(path, allow_objects=True)  # explicit opt-in: inert placeholder
    assert est.num_keypoints == 21


# ----------------------------------------------------------------------------------------------- leftover .tmp files
def test_leftover_tmp_checkpoints_are_removed_at_start(synthetic_pose_data_dir: Path, tmp_path: Path, caplog) -> None:
    """A kill during a save leaves ``.last.ckpt.<random>.tmp`` beside the target; the next start removes it."""
    from bmp_lightning.train import train

    killed = tmp_path / "killed" / "checkpoints"
    killed.mkdir(parents=True)
    torch.save({"state_dict": {}}, killed / "last.ckpt")  # not resumed from here: only its folder matters
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    leftovers = [
        killed / ".last.ckpt.k1x2y3.tmp",
        killed / ".epoch_000.ckpt.abc.tmp",
        run / "checkpoints" / ".last.ckpt.q.tmp",
    ]
    for p in leftovers:
        p.write_bytes(b"half a checkpoint")
    keep = killed / "notes.tmp"
    keep.write_text("not ours")

    caplog.set_level("INFO", logger="bmp_lightning")
    cfg = _pose_cfg(synthetic_pose_data_dir, run, f"ckpt_path={killed / 'last.ckpt'}")
    with pytest.raises(KeyError):  # the stand-in checkpoint cannot be resumed; the cleanup ran before the fit
        train(cfg)
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert f"removed 2 leftover temporary checkpoint file(s) of an interrupted save in {killed}" in caplog.text
    assert (
        f"removed 1 leftover temporary checkpoint file(s) of an interrupted save in {run / 'checkpoints'}"
        in caplog.text
    )


def test_sigkill_during_save_leaves_nothing_after_restart(
    synthetic_pose_data_dir: Path, tmp_path: Path, caplog
) -> None:
    """SIGKILL in the middle of writing last.ckpt (a real process): the next run from that folder cleans up."""
    run = tmp_path / "run"
    proc = _run(
        [
            "bmp_lightning.train",
            *TINY,
            *SHORT,
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"hydra.run.dir={run}",
            "trainer.plugins=[{_target_: tests.test_train_faults.KillDuringSaveIO, step: 2}]",
        ],
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    tmp = list((run / "checkpoints").glob(".*.tmp"))
    assert len(tmp) == 1, "the kill left a temporary file"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1, "the old one stays"

    from bmp_lightning.train import train

    caplog.set_level("INFO", logger="bmp_lightning")
    _, objs = train(_pose_cfg(synthetic_pose_data_dir, run, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert objs["trainer"].global_step == 8
    assert (
        f"removed 1 leftover temporary checkpoint file(s) of an interrupted save in {run / 'checkpoints'}"
        in caplog.text
    )
    assert not list((run / "checkpoints").glob(".*.tmp"))


class KillDuringSaveIO:
    """Test-only: the project's atomic checkpoint IO, SIGKILLed half-way through writing the checkpoint of ``step``."""

    def __new__(cls, step: int):
        import os

        from bmp_lightning.utils.checkpoint_io import AtomicCheckpointIO

        class _IO(AtomicCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                if checkpoint.get("global_step") == step:
                    real_save = torch.save

                    def half_save(obj, f, *a, **k):
                        f.write(b"half a checkpoint")
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)

                    torch.save = half_save
                    try:
                        return super().save_checkpoint(checkpoint, path, storage_options)
                    finally:
                        torch.save = real_save
                return super().save_checkpoint(checkpoint, path, storage_options)

        return _IO()


# ----------------------------------------------------------------------------------------------- skipped samples
def _with_bad_images(synthetic_pose_data_dir: Path, tmp_path: Path, n: int = 2) -> tuple[Path, set[str]]:
    """A copy of the synthetic data whose first ``n`` training images are empty files (unreadable)."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_pose_data_dir / "synthetic_smoke", data_dir / "synthetic_smoke")
    bad = sorted((data_dir / "synthetic_smoke" / "images" / "train").glob("*.jpg"))[:n]
    for p in bad:
        p.write_bytes(b"")
    return data_dir, {p.name for p in bad}


def _expected_skips(dm, epochs: int, batches: int, bad_names: set[str], world: int = 1) -> tuple[int, int]:
    """The run's batches replayed in this process on a cleared SkipLog: (distinct skipped samples, distinct requested
    samples whose image is bad: a lower bound that does not use the dataset's skip code)."""
    ds = dm.train_dataset
    ds.skips.flags.zero_()
    bad_requested = set()
    for rank in range(world):
        for epoch in range(epochs):
            sampler = dm.train_batch_sampler()
            sampler.num_replicas, sampler.rank = world, rank
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            for _, indices in zip(range(batches), sampler):
                for i in indices:
                    ds[i]
                    if Path(ds.records[i].image_path).name in bad_names:
                        bad_requested.add(i)
    return ds.num_bad, len(bad_requested)


def test_skipped_samples_over_workers_reach_metrics_and_logger(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """``data.skip_bad_samples=true``, two unreadable training images, 2 DataLoader workers: the distinct skipped
    samples of all workers reach metrics.json and the CSV logger (before: only per-worker log lines)."""
    import csv

    from bmp_lightning.train import train

    data_dir, names = _with_bad_images(synthetic_pose_data_dir, tmp_path)
    run = tmp_path / "run"
    # whole epochs: with limit_train_batches the workers' prefetching would load (and skip) beyond the limit
    full_epochs = ["trainer.limit_train_batches=1.0", "data.num_workers=2", "data.batch_size=16"]
    cfg = _pose_cfg(data_dir, run, "data.skip_bad_samples=true", *full_epochs)
    metrics, objs = train(cfg)
    expected, lower = _expected_skips(objs["datamodule"], 2, 10**6, names)
    assert expected >= lower > 0
    saved = _strict_json(run / "metrics.json")
    assert saved["train/skipped_samples"] == expected and saved["train/skipped_entries"] == 0
    with open(run / "csv" / "metrics.csv") as f:
        logged = [float(r["train/skipped_samples"]) for r in csv.DictReader(f) if r.get("train/skipped_samples")]
    assert len(logged) == 2 and logged[-1] == expected, "logged at every epoch end (run total so far)"


# 2 spawned processes, ~12 s: kept in the default suite so CI checks the sum over ranks
def test_skipped_samples_are_combined_over_ddp_ranks(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """2 DDP processes (CPU, gloo): each rank marks what its own sampler drew; the reported count is their union."""
    import hydra

    from bmp_lightning.train import train

    data_dir, names = _with_bad_images(synthetic_pose_data_dir, tmp_path, n=3)
    run = tmp_path / "run"
    cfg = _pose_cfg(
        data_dir,
        run,
        "trainer=ddp_sim",
        "data.skip_bad_samples=true",
        "trainer.max_epochs=1",
        "callbacks.visualizer=null",
    )
    train(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    union, lower = _expected_skips(dm, 1, 4, names, world=2)
    assert union >= lower > 0
    assert _strict_json(run / "metrics.json")["train/skipped_samples"] == union
