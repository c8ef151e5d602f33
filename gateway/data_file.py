"""Operator-edited JSON data files (data/models.json, data/process_templates.json), read strictly.

Both files are read once at start-up and trusted from then on, so a mistake must stop the start
with a message that names it, never pass silently: a duplicate key (`json` would keep the last
one), NaN or Infinity, a file too large to be a hand-written one, bytes that are not UTF-8. The
messages never quote the file beyond a clipped value (it may hold anything).
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import ConfigError


def read_json(path: Path, where: str, max_bytes: int, setting_hint: str) -> object:
    """The file's JSON, or ConfigError saying why it cannot be used. `where` starts every message
    ("model registry data/models.json"); `setting_hint` says which setting names the file."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({type(exc).__name__}); {setting_hint}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{where}: larger than {max_bytes // 1024} KiB")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # duplicate keys, NaN, a number over 4300 digits, deep nesting
        reason = str(exc)[:200] if isinstance(exc, _Refused) else f"{type(exc).__name__}: not usable JSON"
        raise ConfigError(f"{where}: {reason}") from None


def shown(value: object) -> str:
    """A value from a file, safe and short in a message (it may be anything: huge, control characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Refused(ValueError):
    """A JSON construct these files refuse (its message is ours, safe to show)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"{shown(key)} appears twice in one object (the later one would silently win)")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise _Refused(f"{name} is not a number these files accept")
