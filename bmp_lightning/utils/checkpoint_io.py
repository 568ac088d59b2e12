"""Atomic local checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system temp
dir; committing it is ``shutil.move``, which degrades to copy + delete when that dir is on another filesystem (a
tmpfs ``/tmp``, a network log dir). A process killed during that copy leaves a truncated ``last.ckpt``, exactly the
file ``ckpt_path=auto`` resumes from. Here the temporary file sits beside the target and is renamed over it
(``os.replace``: atomic on POSIX), after an ``fsync``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote URLs keep Lightning's behaviour)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a checkpoint gets the usual mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
