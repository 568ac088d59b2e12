"""Loggers of the training / evaluation jobs (``conf/logger/``).

:func:`wandb_logger` is Lightning's ``WandbLogger`` with two decisions made for many runs at once:

* **online when W&B credentials exist**, offline otherwise (``offline: null`` in ``conf/logger/wandb.yaml``): an API
  key in ``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host (what ``wandb login`` writes). Offline runs stay
  in ``<run dir>/wandb/`` for ``wandb sync`` later. ``WANDB_MODE`` still overrides both (W&B reads it itself).
* **one run name per multirun job** (``name: null``): ``<experiment>`` for a single run, ``<experiment>-<job
  number>-<the job's own overrides>`` in a Hydra multirun; every job shares the W&B group (``group:
  ${experiment_name}``), so a sweep is one group of distinctly named runs.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("bmp_lightning")

# overrides every job of a sweep shares (or that only say where files go): left out of run names
_NAME_SKIP = ("experiment=", "paths.", "hydra.", "logger", "callbacks.", "trainer.num_nodes=", "trainer.devices=")


def wandb_credentials(netrc_file: str | os.PathLike | None = None) -> bool:
    """Whether W&B can log online: ``WANDB_API_KEY`` set, or a netrc entry (``$NETRC`` or ``~/.netrc``) with a
    password for the W&B host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(netrc_file or os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return False
    try:
        auth = netrc.netrc(os.fspath(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:
        log.warning("W&B: cannot read %s (%s); logging offline", path, err)
        return False
    return bool(auth and auth[2])


def run_name(experiment: str, job_num: int | None = None, overrides: Sequence[str] = ()) -> str:
    """``experiment`` alone, or with the multirun job number and the job's own overrides:
    ``smoke-3-data.mask_alpha=0.5,seed=2``."""
    if job_num is None:
        return experiment
    own = [o for o in overrides if not o.lstrip("+~").startswith(_NAME_SKIP)]
    return "-".join([experiment, str(job_num), *([",".join(own)] if own else [])])


def hydra_run_name(experiment: str) -> str:
    """:func:`run_name` of the running Hydra job (multirun: its number and task overrides); ``experiment`` outside
    Hydra or in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return experiment
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return experiment
    return run_name(experiment, int(hc.job.num), list(hc.overrides.task))


def wandb_logger(
    experiment: str, offline: bool | None = None, name: str | None = None, **kwargs: Any
):  # -> lightning.pytorch.loggers.WandbLogger
    """Lightning's ``WandbLogger``; ``offline=None``: online iff :func:`wandb_credentials`; ``name=None``:
    :func:`hydra_run_name` of ``experiment``."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not wandb_credentials()
    name = name or hydra_run_name(experiment)
    log.info("W&B: %s run %r (group %s)", "offline" if offline else "online", name, kwargs.get("group"))
    return WandbLogger(offline=offline, name=name, **kwargs)
