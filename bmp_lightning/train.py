"""Train a model: ``python -m bmp_lightning.train experiment=maskpose_b [trainer=ddp] [ckpt_path=auto]``."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from bmp_lightning.utils.preflight import preflight
from bmp_lightning.utils.run import (
    atomic_write_json,
    instantiate_dict,
    log_hyperparameters,
    metric_value,
    resolve_ckpt_path,
    set_torch_threads,
    task_wrapper,
)

log = logging.getLogger("bmp_lightning.train")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
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
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.validate(model=model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for r in results for k, v in r.items()})

    if trainer.is_global_zero:
        atomic_write_json(f"{cfg.paths.output_dir}/metrics.json", metrics)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric")) if cfg.get("optimized_metric") in metrics else None


if __name__ == "__main__":
    main()
