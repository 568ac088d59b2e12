"""Config values against the annotations of the callables they configure, before anything is instantiated.

``trainer.max_epochs=abc`` used to end in a ``TypeError`` deep inside Lightning that named neither the key nor the
type wanted. :func:`check_config_types` walks every ``_target_`` node of a config, reads the target's signature and
raises :class:`~bmp_lightning.structures.errors.ConfigError` (``trainer.max_epochs='abc': expected int or None``) for a
value that cannot be of the annotated type. Only annotations it fully understands are checked (int, float, bool, str,
None, Literal, unions, lists/tuples/sequences/dicts of those); anything else (classes, callables, forward references
it cannot resolve) is left to the target itself, so a valid config is never refused.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bmp_lightning.structures.errors import ConfigError

_UNKNOWN = object()  # an annotation this checker does not understand: accept any value


def _hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn, include_extras=False)
    except Exception:  # unresolvable forward references: per parameter, where possible
        hints = {}
        for name, p in _parameters(target).items():
            ann = p.annotation
            if isinstance(ann, str):
                try:
                    ann = eval(ann, getattr(inspect.getmodule(fn), "__dict__", {}))  # noqa: S307 - the target's own module
                except Exception:
                    continue
            if ann is not inspect.Parameter.empty:
                hints[name] = ann
        return hints


def _parameters(target: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if ann is type(None) or ann is None:
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(ann)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (list, tuple, cabc.Sequence, cabc.MutableSequence):
        args = {_describe(a) for a in typing.get_args(ann) if a is not Ellipsis}
        return f"a list of {args.pop()}" if len(args) == 1 else "a list"
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        return "a mapping"
    return getattr(ann, "__name__", str(ann))


def _matches(value: Any, ann: Any) -> Any:
    """True / False, or ``_UNKNOWN`` when the annotation is outside what this checker understands."""
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    if ann is None or ann is type(None):
        return value is None
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in typing.get_args(ann)]
        if any(r is True for r in results):
            return True
        return _UNKNOWN if any(r is _UNKNOWN for r in results) else False
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin in (list, tuple, cabc.Sequence, cabc.MutableSequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        if len(set(map(str, args))) != 1:  # heterogeneous tuples: the container type is enough
            return True
        results = [_matches(v, args[0]) for v in value]
        return False if any(r is False for r in results) else True
    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or ann is dict:
        return isinstance(value, (dict, DictConfig))
    return _UNKNOWN


def check_config_types(cfg: Any, key: str = "") -> None:
    """Raise :class:`ConfigError` for a value of a ``_target_`` node whose type contradicts the target's annotation.

    ``key`` is the node's dotted path (used in the message); nested nodes and lists are walked.
    """
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            check_config_types(item, f"{key}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    target = cfg.get("_target_") if "_target_" in cfg else None
    hints: dict[str, Any] = {}
    if isinstance(target, str):
        from hydra.utils import get_object

        try:
            hints = _hints(get_object(target))
        except Exception:  # an unknown target: hydra's instantiate reports it
            hints = {}
    for name in cfg:
        child_key = f"{key}.{name}" if key else str(name)
        if str(name).startswith("_") or OmegaConf.is_missing(cfg, name):
            continue
        try:
            value = cfg[name]  # interpolations resolved
        except Exception:  # one that cannot resolve here (e.g. ${hydra:...} outside a run): not ours to judge
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            check_config_types(value, child_key)
            items = [value] if isinstance(value, DictConfig) else list(value)
            if any(isinstance(v, DictConfig) and "_target_" in v for v in items):
                continue  # instantiated into objects: their own nodes were checked
            if name not in hints:
                continue
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:
                continue
        if name in hints and _matches(value, hints[name]) is False:
            raise ConfigError(f"{child_key}={value!r}: expected {_describe(hints[name])}")


def check_entry_config(
    cfg: DictConfig, groups: tuple[str, ...] = ("data", "model", "trainer", "callbacks", "logger")
) -> None:
    """:func:`check_config_types` on the config groups an entry point instantiates."""
    for group in groups:
        if group in cfg and cfg.get(group) is not None:
            check_config_types(cfg[group], group)
