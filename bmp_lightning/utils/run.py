"""Run helpers shared by the Hydra entry points: instantiation, seeding, resume, result files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bmp_lightning.structures.checkpoint import check_checkpoint_file
from bmp_lightning.structures.errors import find_user_error

log = logging.getLogger("bmp_lightning")


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config dict (callbacks, loggers); None/empty -> []."""
    objs: list[Any] = []
    if not cfg:
        return objs
    for _, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            objs.append(hydra.utils.instantiate(conf))
    return objs


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """`auto` -> the newest `checkpoints/last.ckpt` among this experiment's runs (siblings of the run dir).

    Run dirs are logs/<task>/<experiment>/<time>, so the experiment folder is the run dir's parent.
    """

    if ckpt_path is None or str(ckpt_path) != "auto":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        if ckpt_path is not None:
            check_checkpoint_file(ckpt_path)  # truncated / unsafe: one clear error before Lightning's torch.load
        return ckpt_path
    output_dir = Path(output_dir)
    candidates = [p for p in output_dir.parent.glob("*/checkpoints/last.ckpt")]
    candidates += list(output_dir.glob("checkpoints/last.ckpt"))
    candidates = sorted(set(candidates), key=lambda p: p.stat().st_mtime)
    if not candidates:
        log.warning("ckpt_path=auto: no last.ckpt under %s; starting from scratch", output_dir.parent)
        return None
    log.info("ckpt_path=auto: resuming from %s", candidates[-1])
    check_checkpoint_file(candidates[-1])
    return str(candidates[-1])


def task_wrapper(fn: Callable) -> Callable:
    """Log failures with the run dir, and always close W&B so multirun jobs don't log into one run.

    A user error (a config value, a bad or unsafe file, a diverged run; also behind Hydra's instantiation error:
    :func:`~bmp_lightning.structures.errors.find_user_error`) is logged as one line, its traceback at debug level;
    anything else with its traceback. The exception is re-raised either way (in-process callers and Hydra multirun
    see it); :func:`exit_on_user_error` turns it into a plain non-zero exit at the command line.
    """

    @wraps(fn)
    def wrapped(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as err:
            run_dir = cfg.paths.get("output_dir", "?") if "paths" in cfg else "?"
            user_err = find_user_error(err)
            if user_err is not None:
                log.error("%s (run dir: %s)", _one_line(user_err), run_dir)
                log.debug("traceback of the error above", exc_info=True)
            else:
                log.exception("task failed; run dir: %s", run_dir)
            raise
        finally:
            try:
                import wandb

                if wandb.run:
                    wandb.finish()
            except ImportError:
                pass

    return wrapped


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def exit_on_user_error(main: Callable) -> Callable:
    """For ``@hydra.main`` functions: a user error (already logged in one line by :func:`task_wrapper`) ends the
    process with exit status 1 instead of Hydra's traceback. ``HYDRA_FULL_ERROR=1`` and multirun jobs (whose
    failures Hydra collects) keep the exception."""

    @wraps(main)
    def wrapped(cfg: DictConfig):
        try:
            return main(cfg)
        except Exception as err:
            if find_user_error(err) is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
                raise
            raise SystemExit(1) from err

    return wrapped


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def log_hyperparameters(cfg: DictConfig, model: Any, loggers: list[Any]) -> None:
    """Send the resolved config plus parameter counts to every logger."""
    if not loggers:
        return
    hp = OmegaConf.to_container(cfg, resolve=True)
    hp["model/params/total"] = sum(p.numel() for p in model.parameters())
    hp["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for lg in loggers:
        lg.log_hyperparams(hp)


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The optimised metric for sweepers; a clear error if it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric '{name}' was not logged; logged: {sorted(metrics)}")
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)
