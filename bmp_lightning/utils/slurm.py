"""SLURM helpers of the entry points: resume of a requeued job, `--cfg` inspection of a multirun command line.

Jobs go to SLURM through Hydra's submitit launcher (``hydra/launcher=slurm``, ``conf/hydra/launcher/slurm.yaml``);
Lightning's ``SLURMEnvironment`` reads the ranks and handles the requeue signal. What is left here is the part neither
does: after a requeue (time limit, preemption, node failure) the job runs again in the *same* run dir (submitit
re-runs the same pickled sweep job, whose timestamped dir Hydra cached), and must continue from its own newest
checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("bmp_lightning")


def slurm_restart_count() -> int:
    """How often SLURM restarted this job (``SLURM_RESTART_COUNT``; 0 outside SLURM or on the first run)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def requeue_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """``ckpt_path`` of a job that SLURM restarted: the newest of the run dir's ``hpc_ckpt_<n>.ckpt`` (Lightning's
    save on the requeue signal) and ``checkpoints/last.ckpt``. Unchanged when ``ckpt_path`` is set or on a first run.
    """
    restarts = slurm_restart_count()
    if ckpt_path is not None or restarts < 1:
        return ckpt_path
    out = Path(output_dir)
    candidates = [*out.glob("hpc_ckpt_*.ckpt"), *out.glob("checkpoints/last.ckpt")]
    if not candidates:
        log.warning("SLURM restart %d: no checkpoint in %s yet; starting from scratch", restarts, out)
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("SLURM restart %d: resuming from %s", restarts, newest)
    return str(newest)


def cfg_without_multirun(argv: Sequence[str]) -> list[str]:
    """Drop ``-m`` / ``--multirun`` when ``--cfg`` / ``-c`` is given: Hydra refuses both at once, yet
    ``train -m hydra/launcher=slurm ... --cfg hydra`` is the natural way to inspect what a sweep would submit."""
    argv = list(argv)
    if not any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv):
        return argv
    return [a for a in argv if a not in ("-m", "--multirun")]
