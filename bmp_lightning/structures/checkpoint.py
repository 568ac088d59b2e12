"""Safe checkpoint loading: ``torch.load(weights_only=True)`` only, and loud reports of key mismatches.

Downloaded ``.pth`` files are pickles; unpickling arbitrary objects can execute code. :func:`safe_load` therefore never
uses ``weights_only=False``. It allowlists plain numpy arrays (MMEngine stores ``meta.dataset_meta`` with numpy arrays),
and on request replaces any other class in the file by an inert placeholder instead of importing it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from bmp_lightning.structures.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)


class UnknownObject:
    """Inert stand-in for a class a checkpoint references but that is not allowlisted (nothing from the file runs).

    Attributes:
        qualname: the global the file named, e.g. ``mmengine.logging.history_buffer.HistoryBuffer``.
        args: constructor arguments recorded in the pickle.
        state: the pickled ``__dict__``/state.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"UnknownObject({self.qualname})"


def _numpy_globals() -> list[Any]:
    """numpy entry points needed to rebuild plain arrays/scalars (pickled by numpy 1.x as ``numpy.core.*``)."""
    core = np._core if hasattr(np, "_core") else np.core
    items: list[Any] = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items.append((core.multiarray._reconstruct, f"{mod}._reconstruct"))
        items.append((core.multiarray.scalar, f"{mod}.scalar"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        items += [
            getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)
        ]
    return items


def _global_name(obj: Any) -> str:
    if isinstance(obj, tuple):
        return obj[1]
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _placeholder_globals(path: Path, allowed: list[Any]) -> list[Any]:
    # Names already allowlisted (numpy arrays/dtypes) must not get a placeholder too: torch keeps the allowlist in a
    # set, so which of two entries with one name wins would change from process to process.
    known = {_global_name(a) for a in allowed}
    names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n not in known]
    return [(type(name.rsplit(".", 1)[-1], (UnknownObject,), {"qualname": name}), name) for name in names]


def safe_load(path: str | Path, *, allow_numpy: bool = True, placeholders: bool = False) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True, map_location='cpu')``.

    Args:
        path: ``.pth``/``.ckpt`` file.
        allow_numpy: also rebuild plain numpy arrays, dtypes and scalars (safe: no user code is involved).
        placeholders: replace every other referenced class/function by an :class:`UnknownObject` (the tensors are
            unaffected), e.g. for MMEngine checkpoints that still carry ``message_hub`` history buffers.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an empty or truncated file, or not a checkpoint at all.
        UnsafeCheckpointError: the file references classes that are not allowlisted (and ``placeholders`` is False).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file: truncated or not a checkpoint")
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: tensors and containers only
        return _load_or_explain(path, [])
    extra: list[Any] = _numpy_globals() if allow_numpy else []
    if placeholders:
        try:
            extra += _placeholder_globals(path, extra)
        except Exception as err:  # e.g. a legacy (non-zip) file that cannot be scanned: load without placeholders
            log.debug("%s: cannot list its globals (%s)", path, err)
    return _load_or_explain(path, extra)


def _not_a_checkpoint(path: Path, err: BaseException) -> CheckpointError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200] or type(err).__name__
    return CheckpointError(f"{path}: truncated or not a checkpoint ({reason})")


def check_checkpoint_file(path: str | Path) -> None:
    """Fail fast, in one line, on a checkpoint that ``torch.load(weights_only=True)`` cannot read: empty, truncated
    or not a checkpoint (:class:`CheckpointError`), or pickling arbitrary Python objects (:class:`UnsafeCheckpointError`
    naming the globals). Reads the archive's directory and pickle opcodes only, not the tensors.

    Used before Lightning resumes from ``ckpt_path`` (its loader would fail deep inside with a long traceback).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file: truncated or not a checkpoint")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip archive / no central directory (cut off) / no data.pkl
        raise _not_a_checkpoint(path, err) from err
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load a checkpoint that pickles arbitrary Python objects (weights_only=True); "
            f"the file references: {', '.join(unsafe)}"
        )


def _load_or_explain(path: Path, extra: list[Any]) -> Any:
    try:
        if not extra:
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as err:  # cut off, or not torch.save
        raise _not_a_checkpoint(path, err) from err
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path) and "global" not in str(err).lower():  # garbage, not a forbidden class
            raise _not_a_checkpoint(path, err) from err
        try:
            listed = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # legacy (non-zip) format or old torch: quote torch's own reason
            listed = ""
        if not listed:
            lines = str(err).splitlines()
            listed = next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0] if lines else "?")[:300]
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle arbitrary Python objects (weights_only=True). The file references: "
            f"{listed}. Load it with safe_load(..., placeholders=True) to keep only tensors and plain data, or "
            f"re-save just its state_dict from an environment you trust."
        ) from err


def extract_state_dict(
    obj: Any, keys: tuple[str, ...] = ("state_dict", "model", "module"), prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, the one reader of every weights layout the project loads
    (Lightning, MMEngine, Meta's ``{"model": ...}``, DDP-wrapped, bare).

    ``obj[k]`` for the first ``k`` in ``keys`` present, else ``obj``; non-tensor entries dropped (with a debug log);
    a ``module.`` prefix on every key (a DDP-wrapped model's save) stripped; with ``prefix`` (``net.`` of a
    LightningModule's network) only the keys under it, prefix removed. No tensors: ``ValueError``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    for k in keys:
        if isinstance(obj.get(k), Mapping):
            obj = obj[k]
            break
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) != len(obj):
        log.debug("ignored %d non-tensor entries", len(obj) - len(sd))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        under = f" under {prefix!r}" if prefix else ""
        raise ValueError(f"no tensors found{under} in the checkpoint (top-level keys: {sorted(map(str, obj))[:20]})")
    return sd


class LoadReport(NamedTuple):
    """What :func:`load_state_dict_report` did not load."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]  # present in both, shapes differ: ``"key: ckpt (..) vs model (..)"``

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def load_state_dict_report(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, name: str = "checkpoint"
) -> LoadReport:
    """Load ``state_dict`` into ``module``, log missing / unexpected / shape-mismatched keys and return them.

    With ``strict=True`` any mismatch raises ``RuntimeError`` (listing all of them) and nothing is loaded; with
    ``strict=False`` the matching entries are loaded and shape mismatches are skipped (e.g. a 17-keypoint head into a
    21-keypoint model).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: {name} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    report = LoadReport(missing, unexpected, mismatched)
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if keys:
            lines.append(f"{len(keys)} {title} keys: {', '.join(keys)}")
    if strict and lines:
        raise RuntimeError(f"{name} does not match {type(module).__name__} (strict):\n  " + "\n  ".join(lines))
    for line in lines:
        log.warning("%s -> %s: %s", name, type(module).__name__, line)
    bad = {m.split(":", 1)[0] for m in mismatched}
    module.load_state_dict({k: v for k, v in state_dict.items() if k not in bad and k in own}, strict=False)
    if not lines:
        log.info("%s: loaded all %d keys into %s", name, len(own), type(module).__name__)
    return report
