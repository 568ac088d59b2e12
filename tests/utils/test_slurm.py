"""SLURM through Hydra's submitit launcher: the launcher config, the sbatch script the real command line writes, a
requeued job that resumes in its own run dir, and the local executor running a 2-job sweep of the smoke model.

No cluster here: ``tests/slurm_dry_run.py`` runs ``bmp_lightning.train -m hydra/launcher=slurm ...`` for real and
replaces only ``sbatch`` and the wait for results; the submitted job is then run by submitit's own job runner
(``python -m submitit.core._submit``) under the environment SLURM gives a task, as the sbatch script's ``srun`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from bmp_lightning.utils.slurm import cfg_without_multirun, requeue_ckpt_path

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra (hydra-submitit-launcher)")

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# tests/test_train.py's tiny smoke model (seconds per epoch)
TINY = [
    "experiment=smoke", "logger=csv", "model.input_size=[48,64]", "model.heatmap_size=[12,16]",
    "+model.net.img_size=[64,48]", "model.net.embed_dim=32", "model.net.depth=1", "model.net.num_heads=2",
    "model.net.deconv_channels=[16,16]", "model.num_layers=3", "model.warmup_iters=2", "data.num_workers=0",
    "data.batch_size=8", "data.val_batch_size=8", "torch_threads=1", "callbacks.visualizer.every_n_epochs=1",
    "callbacks.visualizer.num_samples=2",
]  # fmt: skip


class KillAtEnvStep(Callback):
    """Test-only fault injection: SIGKILL once ``global_step`` reaches ``$BMP_TEST_KILL_AT_STEP`` (unset: never), so
    the same pickled job can be killed on its first run and left alone when SLURM runs it again."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = os.environ.get("BMP_TEST_KILL_AT_STEP")
        if step and trainer.global_step >= int(step):
            os.kill(os.getpid(), 9)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "BMP_SLURM_", "SUBMITIT_"))]:
        del env[key]
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _dry_run(script: Path, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    return _run(["-m", "tests.slurm_dry_run", str(script), "-m", "hydra/launcher=slurm", *overrides], _env(**env))


def _directives(script: Path) -> dict[str, str]:
    lines = [ln[len("#SBATCH --") :] for ln in script.read_text().splitlines() if ln.startswith("#SBATCH --")]
    return dict(ln.partition("=")[::2] for ln in lines)


# ----------------------------------------------------------------------------------------------- config
def test_slurm_launcher_takes_nodes_and_gpus_from_the_trainer(monkeypatch) -> None:
    import hydra
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-long")
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train.yaml", ["hydra/launcher=slurm", "experiment=maskpose_b", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    # (Hydra's plugin discovery imports the plugin module itself: compare the class by name)
    assert type(launcher).__module__.endswith("submitit_launcher") and type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    # maskpose_b trains on trainer=ddp (4 GPUs): 2 nodes x 4 GPUs, one task per GPU
    assert (p["nodes"], p["gpus_per_node"], p["tasks_per_node"]) == (2, 4, 4)
    assert p["partition"] == "gpu-long" and p["account"] is None
    assert p["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    assert p["max_num_timeout"] == 0 and p["name"] == "train_maskpose_b"


def test_cfg_hydra_of_a_multirun_command_shows_the_slurm_launcher() -> None:
    proc = _run(
        ["-m", "bmp_lightning.train", "-m", "hydra/launcher=slurm", "experiment=smoke", "--cfg", "hydra"], _env()
    )
    out = proc.stdout
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    for key, value in (("nodes", "num_nodes"), ("gpus_per_node", "devices"), ("tasks_per_node", "devices")):
        assert f"{key}: ${{trainer.{value}}}" in out, out


def test_cfg_without_multirun() -> None:
    assert cfg_without_multirun(["train", "-m", "a=1", "--cfg", "hydra"]) == ["train", "a=1", "--cfg", "hydra"]
    assert cfg_without_multirun(["train", "--multirun", "-c", "job"]) == ["train", "-c", "job"]
    assert cfg_without_multirun(["train", "-m", "a=1,2"]) == ["train", "-m", "a=1,2"]


# ----------------------------------------------------------------------------------------------- sbatch script
def test_sbatch_script_of_a_two_node_maskpose_job(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    sweep = tmp_path / "sweep"
    _dry_run(
        script, ["experiment=maskpose_b", "trainer.num_nodes=2", f"hydra.sweep.dir={sweep}"],
        SBATCH_PARTITION="gpu", SBATCH_ACCOUNT="lab", BMP_SLURM_TIME_MIN="600", BMP_SLURM_CPUS_PER_TASK="12",
    )  # fmt: skip
    d = _directives(script)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "4" and d["gpus-per-node"] == "4", d
    assert d["cpus-per-task"] == "12" and d["mem"] == "0GB" and d["time"] == "600", d
    assert d["partition"] == "gpu" and d["account"] == "lab" and "qos" not in d, d
    assert d["signal"] == "USR1@120" and d["requeue"] == "", d
    assert d["job-name"] == "train_maskpose_b"
    assert d["output"] == f"{sweep}/.submitit/%j/%j_0_log.out"
    srun = [ln for ln in script.read_text().splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(f"-m submitit.core._submit {sweep}/.submitit/%j"), srun
    # the job itself, pickled for submitit's runner
    assert (sweep / ".submitit" / "4242" / "4242_submitted.pkl").is_file()


# ----------------------------------------------------------------------------------------------- requeue
def test_requeued_job_resumes_from_its_last_ckpt(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """The submitted job is run as SLURM task 0 of 1, killed at step 3 (last.ckpt at step 2), then run again as the
    requeued job (same job id, SLURM_RESTART_COUNT=1): same run dir, resumed from step 2, finished at step 4."""
    import torch

    sweep = tmp_path / "sweep"
    _dry_run(
        tmp_path / "job.sh",
        [
            *TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            "+callbacks.kill._target_=tests.utils.test_slurm.KillAtEnvStep",
            f"paths.data_dir={synthetic_pose_data_dir}", f"hydra.sweep.dir={sweep}",
        ],
    )  # fmt: skip
    task = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train_smoke", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "localhost",
    }  # fmt: skip
    submit = ["-m", "submitit.core._submit", str(sweep / ".submitit" / "4242")]
    killed = _run(submit, _env(**task, BMP_TEST_KILL_AT_STEP="3"), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = sweep / "0"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2

    time.sleep(0.01)
    _run(submit, _env(**task, SLURM_RESTART_COUNT="1"))
    log = (run / "train.log").read_text()
    assert f"SLURM restart 1: resuming from {last}" in log, log[-2000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    assert json.loads((run / "metrics.json").read_text())["val/coco/AP"] >= 0.0
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]


def test_requeue_ckpt_path_picks_the_newest_own_checkpoint(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"a")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeue_ckpt_path(None, tmp_path) is None, "a first run starts from scratch"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeue_ckpt_path(None, tmp_path) == str(last)
    hpc.write_bytes(b"b")
    os.utime(last, (1, 1))  # Lightning's save on the requeue signal is newer than the last periodic last.ckpt
    assert requeue_ckpt_path(None, tmp_path) == str(hpc)
    assert requeue_ckpt_path("other.ckpt", tmp_path) == "other.ckpt", "an explicit ckpt_path wins"
    assert requeue_ckpt_path(None, tmp_path / "fresh") is None


# ----------------------------------------------------------------------------------------------- local executor
# ~30 s (two training processes beside the launcher): kept in the default suite so CI runs the local sweep
def test_submitit_local_two_job_sweep(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    """``hydra/launcher=submitit_local``: the plugin's local executor runs a 2-job sweep, one process per job."""
    sweep = tmp_path / "sweep"
    _run(
        [
            "-m", "bmp_lightning.train", "-m", "hydra/launcher=submitit_local", *TINY, "seed=1,2",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        _env(),
    )  # fmt: skip
    seeds = {}
    for job in ("0", "1"):
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        seeds[job] = overrides.split("seed=")[1].split()[0]
        assert "val/coco/AP" in json.loads((sweep / job / "metrics.json").read_text())
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    assert seeds == {"0": "1", "1": "2"}
    # one submitit job per sweep point, each with its own log
    assert len(list((sweep / ".submitit").glob("*/*_0_log.out"))) == 2
