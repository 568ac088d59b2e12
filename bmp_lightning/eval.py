"""Evaluate a checkpoint: ``python -m bmp_lightning.eval experiment=maskpose_b ckpt_path=<.ckpt>``.

``ckpt_path`` is a Lightning checkpoint of this project; official MMPose weights are evaluated with
``model.init_weights=<MaskPose-b.pth> ckpt_path=null``. Writes ``metrics.json`` in the run dir.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.utils.common import set_torch_threads
from bmp_lightning.utils.config_check import check_entry_config
from bmp_lightning.utils.preflight import preflight
from bmp_lightning.utils.run import exit_on_user_error, instantiate_dict, resolve_ckpt_path, task_wrapper

log = logging.getLogger("bmp_lightning.eval")


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    check_entry_config(cfg)  # a wrongly typed value: one error naming the key, before anything is built
    preflight(cfg)  # every missing input at once, before any logger or DDP process
    set_torch_threads(cfg.get("torch_threads"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    results = trainer.validate(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for r in results for k, v in r.items()}
    if trainer.is_global_zero:
        atomic_write_json(f"{cfg.paths.output_dir}/metrics.json", metrics)
        for k in sorted(metrics):
            log.info("%s = %.4f", k, metrics[k])
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
