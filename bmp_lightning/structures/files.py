"""Result files: always-valid JSON and atomic writes (a temporary file beside the target, renamed over it).

A crash or a kill never leaves a half-written json, picture, weights file or checkpoint: everything the project
writes goes through :func:`atomic_open` (``os.replace`` is atomic on POSIX; the temporary file sits in the target's
folder, so the rename never degrades to a copy across filesystems).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


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


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays and scalars, tensors: (nested lists of) plain numbers
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.<name>.<random>.tmp``) to write; on success it gets the usual file
    mode and is renamed over ``path``, on any error it is removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that writes atomically (:func:`atomic_path`); ``fsync``: flush to disk before the rename
    (checkpoints, which a resumed run reads back)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as json, atomically. Always valid JSON: NaN/inf values are written as ``null``."""
    text = to_json(obj, indent=indent)
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (encoded pictures)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike, fsync: bool = False) -> Path:
    """``torch.save`` atomically (no half-written weights file or checkpoint)."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        torch.save(obj, f)
    return Path(path)
