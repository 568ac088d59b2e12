"""Train a model: ``python -m bmp_lightning.train experiment=maskpose_b [trainer=ddp] [ckpt_path=auto]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.utils.checkpoint_io import remove_stale_tmp_files
from bmp_lightning.utils.common import set_torch_threads
from bmp_lightning.utils.config_check import check_entry_config
from bmp_lightning.utils.preflight import preflight
from bmp_lightning.utils.run import (
    exit_on_user_error,
    instantiate_dict,
    log_hyperparameters,
    metric_value,
    resolve_ckpt_path,
    task_wrapper,
)
from bmp_lightning.utils.slurm import cfg_without_multirun, requeue_ckpt_path

log = logging.getLogger("bmp_lightning.train")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    check_entry_config(cfg)  # a wrongly typed value: one error naming the key, before anything is built
    preflight(cfg)  # every missing input at once, before any logger, W&B run or DDP process
    set_torch_threads(cfg.get("torch_threads"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if "net" in cfg.model:  # lets PoseEstimator.from_checkpoint rebuild the network from a .ckpt
        model.net_config = OmegaConf.to_container(cfg.model.net, resolve=True)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(cfg, model, loggers)

    if cfg.get("train", True):
        # a job SLURM requeued continues from its own run dir's newest checkpoint
        ckpt_path = requeue_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
        ckpt_path = resolve_ckpt_path(ckpt_path, cfg.paths.output_dir)
        if trainer.is_global_zero:  # a kill during a save leaves its temporary file beside the checkpoint
            ckpt_dirs = [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
            remove_stale_tmp_files([*ckpt_dirs, Path(ckpt_path).parent if ckpt_path else None])
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.validate(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for r in results for k, v in r.items()})

    if trainer.is_global_zero:
        atomic_write_json(f"{cfg.paths.output_dir}/metrics.json", metrics)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric")) if cfg.get("optimized_metric") in metrics else None


if __name__ == "__main__":
    sys.argv = cfg_without_multirun(sys.argv)
    main()
