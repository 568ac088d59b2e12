"""Training integration: the Hydra entry points with a tiny MaskPose on synthetic data.

Covers `experiment=smoke` end to end (fast_dev_run; callbacks, loggers, checkpoints, visualiser), a Hydra multirun
ablation (one run dir + metrics per job), resume after a SIGKILL mid-epoch (`ckpt_path=auto`), DDP (2 CPU
processes) validation equal to single-process validation and a 2-process fit, atomic checkpoint writes, and the
sweep configs. Every run writes under the test's tmp dir (`paths.log_dir`, `paths.data_dir`).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# the smoke experiment shrunk to seconds: 64x48 crops (4x3 tokens), one ViT block, tiny head, no workers
TINY = [
    "experiment=smoke",
    "logger=csv",
    "model.input_size=[48,64]",
    "model.heatmap_size=[12,16]",
    "+model.net.img_size=[64,48]",
    "model.net.embed_dim=32",
    "model.net.depth=1",
    "model.net.num_heads=2",
    "model.net.deconv_channels=[16,16]",
    "model.num_layers=3",
    "model.warmup_iters=2",
    "model.lr=2e-3",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "torch_threads=1",
    "callbacks.visualizer.every_n_epochs=1",
    "callbacks.visualizer.num_samples=4",
]


class KillAtStep(Callback):
    """Test-only fault injection: SIGKILL this process once `global_step` reaches `step` (no cleanup at all)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _train_cfg(cfg_train, data_dir: Path, out_dir: Path, *extra: str, callbacks: bool = True):
    """The TINY smoke config through ``cfg_train`` (tests/conftest.py), run dir ``out_dir``."""
    tiny = TINY if callbacks else [o for o in TINY if not o.startswith("callbacks.")]
    paths = [f"paths.data_dir={data_dir}", f"paths.log_dir={out_dir.parent}"]
    return cfg_train(*tiny, *paths, *extra, out_dir=out_dir)


def _untrained_losses(cfg, steps: int, world: int = 1, rank: int = 0) -> list[float]:
    """The heatmap loss of an all-zero prediction on the first ``steps`` training batches ``rank`` of ``world`` sees.

    That is the loss an untrained network logs: the head's last conv starts at N(0, 0.001) (MMPose's init), so its
    heatmaps are ~1e-3 and the loss is the weighted mean of the squared targets. Computed here from the configured
    datamodule, its batch sampler and the codec's targets, independently of the LightningModule.
    """
    import hydra

    from bmp_lightning.data.codec import keypoint_mse_loss

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    sampler = dm.train_batch_sampler()
    sampler.num_replicas, sampler.rank = world, rank
    losses = []
    for _, indices in zip(range(steps), sampler, strict=False):
        items = [dm.train_dataset[i] for i in indices]
        target = torch.stack([torch.as_tensor(s["heatmaps"]) for s in items])
        weights = torch.stack([torch.as_tensor(s["keypoint_weights"]) for s in items])
        losses.append(float(keypoint_mse_loss(torch.zeros_like(target), target, weights)))
    return losses


def _run(args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ----------------------------------------------------------------------------------------------- single runs
def test_fast_dev_run(synthetic_pose_data_dir: Path, tmp_path: Path, cfg_train) -> None:
    from bmp_lightning.train import train

    cfg = _train_cfg(cfg_train, synthetic_pose_data_dir, tmp_path / "run", "+trainer.fast_dev_run=true")
    assert cfg.model.use_mask and cfg.data.use_mask, "the smoke experiment is a MaskPose"
    metrics, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    # One step cannot learn (val/coco/AP is 0.0: every instance score is 0), so no AP floor; the logged loss is
    # checked instead: it is the untrained network's loss on the first batch, 0.03986 measured against 0.03986
    # recomputed (a wrong batch, target, keypoint weight or loss scale is off by far more than 0.2 %).
    assert metrics["train/loss"] == pytest.approx(_untrained_losses(cfg, steps=1)[0], rel=2e-3)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val/coco/AP"] == metrics["val/coco/AP"]


def test_train_callbacks_loggers_checkpoints(synthetic_pose_data_dir: Path, tmp_path: Path, cfg_train) -> None:
    """2 epochs with both loggers: CSV + W&B offline files, lr monitor, best + last checkpoints, visualiser PNGs."""
    from bmp_lightning.train import train

    run = tmp_path / "run"
    cfg = _train_cfg(
        cfg_train,
        synthetic_pose_data_dir,
        run,
        "logger=many_loggers",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    )
    metrics, objs = train(cfg)
    trainer = objs["trainer"]
    assert trainer.global_step == 6

    # checkpoints: best on val/coco/AP + one last.ckpt (both checkpoint callbacks write it: never last-v1.ckpt)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and not any(n.startswith("last-v") or n.endswith(".tmp") for n in ckpts), ckpts
    assert trainer.checkpoint_callback.monitor == "val/coco/AP"
    assert Path(trainer.checkpoint_callback.best_model_path).name in ckpts
    assert _ckpt_step(run / "checkpoints" / "last.ckpt") == 6
    # Lightning resumes with torch.load(weights_only=True): no OmegaConf objects may hide in the hparams
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["milestones"] == [6] and state["net_config"]["embed_dim"] == 32

    rows = _csv_rows(run)
    ap = [float(r["val/coco/AP"]) for r in rows if r.get("val/coco/AP")]
    assert len(ap) == 2 and ap[-1] == pytest.approx(metrics["val/coco/AP"])
    assert any(r.get("lr-AdamW/pg1") for r in rows), "LearningRateMonitor logged nothing"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run written"
    wandb_cfg = (run / "csv" / "hparams.yaml").read_text()
    assert "experiment_name: smoke" in wandb_cfg and "${" not in wandb_cfg, "the resolved config is logged"

    # visualiser: one PNG per validation epoch, GT | prediction panels of the 4 first crops (64x48 each)
    import cv2

    pngs = sorted((run / "vis").glob("epoch_*.png"))
    assert [p.name for p in pngs] == ["epoch_000_step_000003.png", "epoch_001_step_000006.png"]
    img = cv2.imread(str(pngs[-1]))
    assert img.shape == (2 + 64 + 2, 2 + 4 * (48 + 2 + 48 + 2), 3)
    assert list((run / "wandb").glob("offline-run-*/files/media/images/val/vis_*.png")), "no W&B image logged"


# ----------------------------------------------------------------------------------------------- multirun
def test_multirun_ablation_one_dir_per_job(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    _run(
        [
            "bmp_lightning.train",
            "-m",
            "ablation=mask_alpha",
            "+debug=limit",
            *TINY,
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    alphas = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        alpha = float(overrides.split("data.mask_alpha=")[1].split()[0])
        metrics = json.loads((job / "metrics.json").read_text())
        assert "val/coco/AP" in metrics, job
        assert [r["step"] for r in _csv_rows(job) if r.get("val/coco/AP")], job
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "vis").is_dir()
        alphas[job.name] = alpha
    assert sorted(alphas.values()) == [0.0, 0.2, 0.5, 1.0], alphas
    assert not list((tmp_path / "logs").glob("**/metrics.json")), "jobs must write into their own sweep subdirs"


# ----------------------------------------------------------------------------------------------- resume
def test_resume_after_kill_mid_epoch(synthetic_pose_data_dir: Path, tmp_path: Path, caplog, cfg_train) -> None:
    """SIGKILL at step 5 of 6 in epoch 0; `ckpt_path=auto` picks the killed run's last.ckpt (step 4) and finishes.

    The killed run is a real `python -m bmp_lightning.train` process; the resumed one runs in-process (faster).
    """
    from bmp_lightning.train import train

    logs = tmp_path / "logs"
    exp_dir = logs / "train" / "smoke"
    common = [
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=6",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    killed = _run(
        [
            "bmp_lightning.train",
            *TINY,
            *common,
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"paths.log_dir={logs}",
            f"hydra.run.dir={exp_dir / 'run1'}",
            "+callbacks.kill._target_=tests.test_train.KillAtStep",
            "+callbacks.kill.step=5",
        ],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last1 = exp_dir / "run1" / "checkpoints" / "last.ckpt"
    assert _ckpt_step(last1) == 4, "last.ckpt is written every 2 steps, mid-epoch too"

    caplog.set_level("INFO", logger="bmp_lightning")
    cfg = _train_cfg(cfg_train, synthetic_pose_data_dir, exp_dir / "run2", *common, "ckpt_path=auto")
    _, objs = train(cfg)
    assert f"resuming from {last1}" in caplog.text
    assert objs["trainer"].global_step == 12
    assert _ckpt_step(exp_dir / "run2" / "checkpoints" / "last.ckpt") == 12
    steps = [int(r["step"]) for r in _csv_rows(exp_dir / "run2") if r.get("train/loss_step")]
    assert steps and min(steps) >= 4, "the resumed run continues the global step"
    epochs = {int(r["epoch"]) for r in _csv_rows(exp_dir / "run2") if r.get("val/coco/AP")}
    assert epochs == {0, 1}, "the interrupted epoch is finished, then the next one"


# ----------------------------------------------------------------------------------------------- DDP (2 CPU procs)
@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_pose_data_dir: Path, tmp_path_factory, compose_cfg) -> Path:
    from bmp_lightning.train import train

    run = tmp_path_factory.mktemp("ckpt_run") / "run"
    cfg = _train_cfg(
        functools.partial(compose_cfg, "train.yaml", base_dir=run.parent),
        synthetic_pose_data_dir,
        run,
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=4",
        "callbacks=none",
        "~logger",
        "+trainer.enable_checkpointing=false",
        callbacks=False,
    )
    _, objs = train(cfg)
    path = run / "tiny.ckpt"
    objs["trainer"].save_checkpoint(path)
    return path


def _predictions(run: Path) -> list[tuple[int, tuple[float, ...], float]]:
    preds = json.loads((run / "results_coco.keypoints.json").read_text())
    return sorted((p["image_id"], tuple(p["keypoints"]), p["score"]) for p in preds)


def test_ddp_sim_validation_equals_single_process(
    synthetic_pose_data_dir: Path, tiny_checkpoint: Path, tmp_path: Path, cfg_eval
) -> None:
    from bmp_lightning.eval import evaluate

    results = {}
    for trainer in ("cpu", "ddp_sim"):
        cfg = cfg_eval(
            *[o for o in TINY if not o.startswith("callbacks.")],
            f"trainer={trainer}",
            "~logger",
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"ckpt_path={tiny_checkpoint}",
            out_dir=tmp_path / trainer,
        )
        metrics, objs = evaluate(cfg)
        results[trainer] = metrics
        if trainer == "cpu":  # under ddp_spawn the datamodule is set up in the workers only
            n_val = len(objs["datamodule"].val_sets_info[0].records)
    assert n_val % 2 == 1, "an odd val set: the 2-rank DistributedSampler pads a duplicate"
    assert results["ddp_sim"] == results["cpu"]
    assert len(_predictions(tmp_path / "cpu")) == n_val
    assert _predictions(tmp_path / "ddp_sim") == _predictions(tmp_path / "cpu")


def test_ddp_sim_fit(synthetic_pose_data_dir: Path, tmp_path: Path, cfg_train) -> None:
    from bmp_lightning.train import train

    run = tmp_path / "run"
    cfg = _train_cfg(
        cfg_train,
        synthetic_pose_data_dir,
        run,
        "trainer=ddp_sim",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "callbacks.rich_progress_bar=null",
    )
    metrics, objs = train(cfg)
    assert objs["trainer"].world_size == 2
    # Two steps cannot learn (val/coco/AP is 0.0), so no AP floor; rank 0's logged losses are checked instead: they
    # are the untrained loss on rank 0's own batches (measured 0.04399 / 0.04387 vs 0.04400 / 0.04388 recomputed),
    # not on the single-process batches (0.04576 / 0.04281): the ranks train on their own shards of every stream.
    rank0 = _untrained_losses(cfg, steps=2, world=2, rank=0)
    assert metrics["train/loss_step"] == pytest.approx(rank0[-1], rel=2e-3)
    assert metrics["train/loss_epoch"] == pytest.approx(sum(rank0) / 2, rel=2e-3)
    # each rank takes its own half of every batch: 2 steps per rank, one optimizer step each
    assert _ckpt_step(run / "checkpoints" / "last.ckpt") == 2
    assert len(list((run / "vis").glob("*.png"))) == 1, "rank 0 alone draws"


# ----------------------------------------------------------------------------------------------- units
def test_atomic_checkpoint_io_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    from bmp_lightning.utils.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4)}, path)
    assert _ckpt_step(path) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "the usual file mode, not mkstemp's 0600"

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert _ckpt_step(path) == 1, "the previous checkpoint survives an interrupted write"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file left behind"


def test_crop_transforms_invert_codec() -> None:
    import cv2

    from bmp_lightning.data.codec import keypoints_to_image
    from bmp_lightning.utils.callbacks import crop_affine, image_to_crop

    rng = np.random.default_rng(0)
    center = np.array([[120.0, 90.0], [40.5, 200.0]])
    scale = np.array([[150.0, 200.0], [75.0, 100.0]])
    crop_pts = rng.uniform(0, 190, (2, 5, 2))
    img_pts = keypoints_to_image(crop_pts, center, scale, (192, 256))
    np.testing.assert_allclose(image_to_crop(img_pts, center, scale, (192, 256)), crop_pts, atol=1e-9)
    # the warp matrix maps an image pixel to the same crop pixel as image_to_crop
    m = crop_affine(center[0], scale[0], (192, 256))
    p = np.array([100.0, 80.0])
    np.testing.assert_allclose(m[:, :2] @ p + m[:, 2], image_to_crop(p[None, None], center[:1], scale[:1])[0, 0])
    mask = np.zeros((300, 300), np.uint8)
    mask[80, 100] = 1
    warped = cv2.warpAffine(mask, m, (192, 256), flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(warped)
    expect = image_to_crop(p[None, None], center[:1], scale[:1])[0, 0]
    assert np.abs(xs - expect[0]).max() <= 1 and np.abs(ys - expect[1]).max() <= 1


def test_render_pose_panels_draws_gt_left_prediction_right() -> None:
    from bmp_lightning.utils.callbacks import GT_COLOR, MASK_COLOR, PRED_COLOR, render_pose_panels

    crops = np.zeros((3, 64, 48, 3), np.uint8)
    gt = np.full((3, 21, 2), 20.0)
    gt[:, :, 0] += np.arange(21)  # a row of joints
    pred = gt + 5.0
    mask = np.zeros((64, 48), np.uint8)
    mask[30:50, 5:40] = 1
    out = render_pose_panels(crops, gt, np.ones((3, 21)), pred, np.ones((3, 21)), [mask, None, None], cols=2)
    assert out.shape == (2 + 2 * (64 + 2), 2 + 2 * (48 + 2 + 48 + 2), 3)
    left, right = out[2 : 2 + 64, 2 : 2 + 48], out[2 : 2 + 64, 2 + 50 : 2 + 98]
    has = lambda im, c: bool((np.abs(im.astype(int) - np.array(c)).sum(-1) < 60).any())  # noqa: E731
    assert has(left, GT_COLOR) and not has(left, PRED_COLOR)
    assert has(right, PRED_COLOR) and not has(right, GT_COLOR)
    assert (left[30:50, 5:40] != 0).any() and not has(right, MASK_COLOR), "mask drawn on the GT panel only"


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("ablation", "params"),
    [
        ("mask_alpha", {"data.mask_alpha": "0.0,0.2,0.5,1.0"}),
        ("mask_perturbation", {"data.mask_perturb": "true,false"}),
        ("layer_decay", {"model.layer_decay": "0.65,0.75,0.85,1.0"}),
        ("data_ratio", {"data.train_sources.1.ratio": "0,1", "data.train_sources.2.ratio": "0,1"}),
    ],
)
def test_ablation_configs_are_sweeps(ablation: str, params: dict[str, str]) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=smoke", f"ablation={ablation}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert {k: str(v) for k, v in cfg.hydra.sweeper.params.items()} == params
    for key in params:  # every swept key exists in the composed config
        node = cfg
        for part in key.split("."):
            node = node[int(part)] if part.isdigit() else node[part]


def test_optuna_search_config() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=smoke", "hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/coco/AP"
    assert set(sweeper.params) == {"model.lr", "model.layer_decay", "model.net.drop_path_rate"}
    sampler = instantiate(sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"


def test_optuna_sweep_runs(synthetic_pose_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    _run(
        [
            "bmp_lightning.train",
            "hparams_search=optuna",
            "+debug=limit",
            *[o for o in TINY if not o.startswith("model.lr=")],  # a fixed value would leave the search space
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "hydra.sweeper.n_trials=2",
            f"paths.data_dir={synthetic_pose_data_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.lr", "model.layer_decay", "model.net.drop_path_rate"}
    assert 1e-4 <= best["best_params"]["model.lr"] <= 3e-3
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 2 and all("val/coco/AP" in json.loads((j / "metrics.json").read_text()) for j in jobs)
