"""Errors that are the user's to fix (a config value, a file, a diverged run): the entry points report them in one
line (``utils.run.task_wrapper``), with the full traceback at debug level or under ``HYDRA_FULL_ERROR=1``."""

from __future__ import annotations

from bmp_lightning.structures.records import BadSampleError


class UserError(RuntimeError):
    """A problem with the input (config, file) or the run itself; its message says what and where."""


class ConfigError(UserError, TypeError):
    """A config value of the wrong type (names the key and the type wanted)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint / weights file that cannot be read (truncated, empty, not a checkpoint)."""


class UnsafeCheckpointError(RuntimeError):
    """The file holds Python objects other than tensors/containers/numpy arrays and would need full unpickling."""


def is_user_error(err: BaseException) -> bool:
    """Errors whose message is the whole story: ours, a bad sample / unsafe pickle, a missing file."""

    return isinstance(err, (UserError, BadSampleError, UnsafeCheckpointError, FileNotFoundError))


def find_user_error(err: BaseException) -> BaseException | None:
    """``err`` or the user error it wraps (Hydra's ``InstantiationException`` chains the target's error as its cause,
    e.g. a truncated ``model.init_weights`` file), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if is_user_error(err):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None
