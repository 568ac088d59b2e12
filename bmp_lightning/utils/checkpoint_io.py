"""Atomic local checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system temp
dir; committing it is ``shutil.move``, which degrades to copy + delete when that dir is on another filesystem (a
tmpfs ``/tmp``, a network log dir). A process killed during that copy leaves a truncated ``last.ckpt``, exactly the
file ``ckpt_path=auto`` resumes from. Here the temporary file sits beside the target and is renamed over it
(``os.replace``: atomic on POSIX), after an ``fsync``. A checkpoint with NaN/inf weights is refused
(:func:`~bmp_lightning.utils.fit_guard.check_finite_state`), and :func:`remove_stale_tmp_files` clears the temporary
files a kill during a save left behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from bmp_lightning.structures.files import atomic_torch_save
from bmp_lightning.utils.fit_guard import check_finite_state

log = logging.getLogger(__name__)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote URLs keep Lightning's behaviour)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        check_finite_state(checkpoint, path)  # NaN/inf weights never become last.ckpt / best
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"), fsync=True)


def remove_stale_tmp_files(dirs: Iterable[str | os.PathLike | None]) -> int:
    """Delete the temporary files of checkpoint writes that a kill interrupted (``.<name>.ckpt.<random>.tmp`` beside
    the target, :class:`AtomicCheckpointIO`); logs and returns how many. Only this naming pattern is touched.

    Call at the start of a run (rank 0), before anything saves: for the run's checkpoint folders and the folder of
    the checkpoint it resumes from.
    """
    removed = 0
    for d in dict.fromkeys(Path(str(x).removeprefix("file://")) for x in dirs if x and _is_local(x)):
        if not d.is_dir():
            continue
        stale = [p for p in d.glob(".*.ckpt.*.tmp") if p.is_file()]
        for p in stale:
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:  # gone meanwhile
                pass
        if stale:
            log.info("removed %d leftover temporary checkpoint file(s) of an interrupted save in %s", len(stale), d)
    return removed
