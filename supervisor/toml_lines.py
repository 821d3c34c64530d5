"""Line numbers of keys in TOML text, for error messages.

`tomllib` returns plain dicts without positions, so `KeyLines` scans the text
once and records the first line that defines each key path: table headers,
array-of-tables headers and `key = value` lines, dotted keys included. The
parents of a defined path get the same line unless they have an earlier one,
so `[projects.web.backoff]` also locates `projects.web` when the file has no
`[projects.web]` header.

Keys inside inline tables (`backoff = { factor = 2 }`) are not indexed. A
lookup of such a key returns the line of the nearest enclosing key, which is
the line that contains the inline table.
"""

from __future__ import annotations

import re
import tomllib

Key = tuple[str, ...]

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\\n]|\\.)*"'
_LITERAL = r"'[^'\n]*'"
_PART = rf"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_DOTTED = rf"{_PART}(?:[ \t]*\.[ \t]*{_PART})*"

_PART_PATTERN = re.compile(_PART)
_ARRAY_TABLE = re.compile(rf"[ \t]*\[\[[ \t]*({_DOTTED})[ \t]*\]\]")
_TABLE = re.compile(rf"[ \t]*\[[ \t]*({_DOTTED})[ \t]*\]")
_KEY_VALUE = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")


class KeyLines:
    """Index from key paths to the 1-based line that defines them."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Key, int] = {}
        table: Key = ()
        string_end: str | None = None

        for number, line in enumerate(text.splitlines(), start=1):
            # The lines of a multi-line string are values, never keys.
            if string_end is not None:
                if string_end in line:
                    string_end = None
                continue

            header = _ARRAY_TABLE.match(line) or _TABLE.match(line)
            if header:
                table = _split_key(header[1])
                self._record(table, number)
            elif match := _KEY_VALUE.match(line):
                self._record(table + _split_key(match[1]), number)
                string_end = _open_multiline_string(line[match.end() :])

    def line_of(self, key: Key) -> int | None:
        """Return the line of `key`, else of its nearest parent with a line."""
        for length in range(len(key), 0, -1):
            line = self._lines.get(key[:length])
            if line is not None:
                return line
        return None

    def _record(self, key: Key, line: int) -> None:
        for length in range(1, len(key) + 1):
            self._lines.setdefault(key[:length], line)


def _split_key(dotted: str) -> Key:
    return tuple(_unquote(part) for part in _PART_PATTERN.findall(dotted))


def _unquote(part: str) -> str:
    if part.startswith('"'):
        # Basic strings have TOML escapes, so let tomllib decode them.
        try:
            return str(tomllib.loads(f"key = {part}")["key"])
        except tomllib.TOMLDecodeError:
            return part
    if part.startswith("'"):
        return part[1:-1]
    return part


def _open_multiline_string(value: str) -> str | None:
    """Return the delimiter of a multi-line string that `value` leaves open."""
    value = value.lstrip()
    for delimiter in ('"""', "'''"):
        if value.startswith(delimiter) and delimiter not in value[3:]:
            return delimiter
    return None
