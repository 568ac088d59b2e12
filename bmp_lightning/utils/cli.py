"""The ``key=value`` command lines of the non-Hydra tools (``convert``, ``doctor``, ``tools.*``): one style for all."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any


def parse_key_values(
    argv: Sequence[str], usage: str = "", typed: bool = False, multi: Collection[str] = ()
) -> dict[str, Any]:
    """``key=value`` arguments -> dict (``--key=value`` and dashes in keys accepted); anything else exits with
    ``usage``. ``typed``: values through :func:`parse_value` (else strings). Keys in ``multi`` may repeat and collect
    a list (``eval_arg=loop.num_iters=3 eval_arg=...``: the value is everything after the first ``=``)."""
    args: dict[str, Any] = {k: [] for k in multi}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value pairs, got {a!r}\n{usage}")
        key = key.lstrip("-").replace("-", "_")
        value = parse_value(value) if typed and key not in multi else value
        if key in multi:
            args[key].append(value)
        else:
            args[key] = value
    return args


def parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, ``none``/``null`` -> None, numbers -> int / float, ``a,b`` or ``[a,b]`` -> tuple,
    anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text or text.startswith(("[", "(")):
        return tuple(parse_value(v.strip()) for v in text.strip("[]()").split(",") if v.strip())
    return text
