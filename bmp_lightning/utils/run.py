"""Run helpers shared by the Hydra entry points: instantiation, seeding, resume, result files."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

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


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (json ``null``) and numpy/torch values made plain.

    ``json.dump`` writes a non-finite float as a bare ``NaN``/``Infinity``, which is not JSON (strict parsers, jq and
    JavaScript reject the whole file).
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return json_safe(_json_default(obj)) if hasattr(obj, "item") or hasattr(obj, "tolist") else obj


def to_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: non-finite floats become ``null`` (see :func:`json_safe`)."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default, **kwargs)
    except ValueError:  # a NaN/inf somewhere: the (slower) sanitised copy
        return json.dumps(json_safe(obj), allow_nan=False, default=_json_default, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write json through a temporary file + rename, so a crash never leaves a half-written result file.

    Always valid JSON: NaN/inf values are written as ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(obj, indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays and scalars, tensors: (nested lists of) plain numbers
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """`auto` -> the newest `checkpoints/last.ckpt` among this experiment's runs (siblings of the run dir).

    Run dirs are logs/<task>/<experiment>/<time>, so the experiment folder is the run dir's parent.
    """
    from bmp_lightning.structures.checkpoint import check_checkpoint_file

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


def set_torch_threads(threads: int | None) -> None:
    """Intra-op threads of this process (None: leave torch's default, one per core).

    On a small CPU machine the default oversubscribes the cores once DataLoader workers run beside the training
    process, and OpenMP's spinning threads then slow a step down several times; 1 is right for CPU smoke runs.
    """
    if threads is None:
        return
    import torch

    if int(threads) < 1:
        raise ValueError(f"torch_threads must be >= 1 or null, got {threads}")
    torch.set_num_threads(int(threads))


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The optimised metric for sweepers; a clear error if it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric '{name}' was not logged; logged: {sorted(metrics)}")
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temporary file + rename (no half-written weights file)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
