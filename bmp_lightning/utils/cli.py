"""The ``key=value`` command lines of the non-Hydra tools (convert, metrics.coco, tools.*)."""

from __future__ import annotations

from collections.abc import Sequence


def parse_key_values(argv: Sequence[str], usage: str = "") -> dict[str, str]:
    """``key=value`` arguments -> dict (``--key=value`` and dashes in keys accepted); anything else exits with
    ``usage``."""
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value pairs, got {a!r}\n{usage}")
        args[key.lstrip("-").replace("-", "_")] = value
    return args
