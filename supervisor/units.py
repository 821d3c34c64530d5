"""Durations and byte sizes as they are written in the config file.

Durations are a number of seconds (`10`, `0.5`) or a string of one or more
number-unit pairs: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"1h30m"`, `"2d"`.
Sizes are a number of bytes (`1048576`) or a string with an SI unit (`"500KB"`,
1 KB = 1000 bytes) or an IEC unit (`"10MiB"`, 1 MiB = 1024 * 1024 bytes).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)

DURATION_HELP = (
    'write a number of seconds or a string such as "500ms", "10s", "5m", "1h" '
    'or "1h30m"'
)
SIZE_HELP = (
    'write a number of bytes or a string such as "500KB" (1 KB = 1000 bytes) '
    'or "10MiB" (1 MiB = 1048576 bytes)'
)


def parse_duration(value: str | int | float) -> float:
    """Convert a duration to seconds.

    A bare number is a number of seconds. A string is a bare number or
    number-unit pairs with the units ms, s, m, h and d. Both may be negative,
    so that the caller can report the allowed range itself.

    Raises:
        ValueError: the value is not a duration. The message names the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration: {DURATION_HELP}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number of seconds")
        return float(value)

    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.removeprefix("-")
    if _BARE_NUMBER.fullmatch(text):
        return sign * float(text)
    seconds = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match[1]) * _DURATION_UNITS[match[2].lower()]
        position = match.end()
    if position == 0 or text[position:].strip():
        raise ValueError(f"{value!r} is not a duration: {DURATION_HELP}")
    return sign * seconds


def format_duration(seconds: float) -> str:
    """Format seconds as the shortest duration string that parses back to it.

    Examples: 0 -> "0s", 0.5 -> "500ms", 90 -> "1m30s", 5400 -> "1h30m".
    Precision is one microsecond.
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    microseconds = round(seconds * 1_000_000)
    if microseconds == 0:
        return "0s"

    hours, microseconds = divmod(microseconds, 3_600_000_000)
    minutes, microseconds = divmod(microseconds, 60_000_000)
    whole_seconds, microseconds = divmod(microseconds, 1_000_000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if whole_seconds:
        parts.append(f"{whole_seconds}s")
    if microseconds:
        parts.append(f"{microseconds / 1000:g}ms")
    return "".join(parts)


def parse_size(value: str | int) -> int:
    """Convert a size to a whole number of bytes.

    Raises:
        ValueError: the value is not a size. The message names the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size: {SIZE_HELP}")
    if isinstance(value, int):
        return value

    match = _SIZE.fullmatch(value)
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size: {SIZE_HELP}")
    # Exact, because the float of a long number is infinite and has no int.
    return int(Fraction(match[1]) * _SIZE_UNITS[match[2].lower()])


def format_size(size: int) -> str:
    """Format a byte count with the largest IEC unit that divides it exactly."""
    units = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
    for unit, factor in units:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
