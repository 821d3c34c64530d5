"""A small YAML writer for Kubernetes manifests, in block style.

Keys keep their insertion order. A string is written plain when YAML 1.1
and 1.2 both read it back as the same string, as a literal block (`|`)
when it is multi-line text that the block keeps byte for byte, and
double-quoted with JSON escapes otherwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

Document = dict[str, Any]

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
# Words that YAML 1.1 reads as booleans or null.
_RESERVED = {
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~",
}  # fmt: skip


def yaml_document(document: Document) -> str:
    """Return one YAML document, ending with a newline."""
    return "\n".join(_mapping_lines(document, 0)) + "\n"


def _mapping_lines(mapping: dict[str, Any], indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for key, value in mapping.items():
        prefix = f"{pad}{_scalar(key)}:"
        lines += _value_lines(prefix, value, indent)
    return lines


def _value_lines(prefix: str, value: Any, indent: int) -> list[str]:
    if isinstance(value, dict):
        if not value:
            return [f"{prefix} {{}}"]
        return [prefix, *_mapping_lines(value, indent + 2)]
    if isinstance(value, list):
        if not value:
            return [f"{prefix} []"]
        return [prefix, *_sequence_lines(value, indent + 2)]
    if isinstance(value, str) and _fits_literal_block(value):
        pad = " " * (indent + 2)
        return [
            f"{prefix} |",
            *(f"{pad}{line}" if line else "" for line in value[:-1].split("\n")),
        ]
    return [f"{prefix} {_scalar(value)}"]


def _sequence_lines(items: list[Any], indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for item in items:
        if isinstance(item, dict) and item:
            first, *rest = _mapping_lines(item, indent + 2)
            lines.append(f"{pad}- {first.lstrip()}")
            lines += rest
        else:
            lines += _value_lines(f"{pad}-", item, indent)
    return lines


def _fits_literal_block(text: str) -> bool:
    """Return whether `|` keeps the text exactly: several lines, one final
    newline, no trailing spaces, printable characters and tabs only, and a
    first line that does not start with a space."""
    if "\n" not in text[:-1] or not text.endswith("\n") or text.endswith("\n\n"):
        return False
    if text.startswith((" ", "\t")):
        return False
    for line in text[:-1].split("\n"):
        if line != line.rstrip(" \t"):
            return False
        if any(not char.isprintable() and char != "\t" for char in line):
            return False
        if "\ufeff" in line:
            return False
    return True


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)
