"""Durations and sizes as written in relay.toml: pure parsing and formatting.

Durations are ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` (also combined, ``"1h30m"``,
and ``"250ms"``); sizes are ``"35MB"``, ``"512KB"``, ``"100B"`` with decimal
multiples (1 MB = 1,000,000 bytes) and binary ones (``"1MiB"``) on request.
"""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.I)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_duration(text: object) -> float:
    """``"1h30m"`` -> 5400.0 seconds; raise ValueError with a sentence otherwise."""
    if not isinstance(text, str):
        raise ValueError('expected a duration string such as "30s", "5m", "4h" or "5d"')
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(
            f'"{text}" is not a duration; write e.g. "30s", "5m", "4h" or "5d"'
        )
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration: 300 -> ``"5m"``."""
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    seconds = int(seconds)
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_size(value: object) -> int:
    """``"35MB"`` -> 35_000_000; an integer is a number of bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "35MB" or "512KB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError('expected a size such as "35MB" or "512KB"')
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f'"{value}" is not a size; write e.g. "35MB" or "512KB"')
    unit = (m.group(2) or "b").lower()
    return int(float(m.group(1)) * _SIZE_UNITS[unit])
