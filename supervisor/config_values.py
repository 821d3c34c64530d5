"""Checkers of single config values, and the collector of their problems.

A checker takes the `Problems` of the file, the key path of a value and the
value that `tomllib` returned. It reports what is wrong, if anything, and
returns the value in the form that `Config` decodes: durations in seconds,
sizes in bytes, full signal names. It returns None for an invalid value, and
TOML has no null, so None never stands for a valid value.

A problem is one line, `FILE:LINE: KEY: message`, where the line is the one
that defines the key (see `toml_lines`).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import signal
import zoneinfo
from collections.abc import Callable, Iterable
from datetime import date, datetime, time
from urllib.parse import urlsplit

from supervisor.toml_lines import Key, KeyLines
from supervisor.units import (
    DURATION_HELP,
    SIZE_HELP,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

# SIGKILL and SIGSTOP cannot be caught, so a run could not stop cleanly.
_UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")


class Problems:
    """Problems found in one file, each formatted as `FILE:LINE: KEY: message`."""

    def __init__(self, source: str, lines: KeyLines) -> None:
        self.source = source
        self.lines = lines
        self._found: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._found)

    def add(self, key: Key, message: str, *, line: int | None = None) -> None:
        if line is None:
            line = self.lines.line_of(key)
        location = self.source if line is None else f"{self.source}:{line}"
        text = (
            f"{location}: {format_key(key)}: {message}"
            if key
            else f"{location}: {message}"
        )
        self._found.append((line or 0, text))

    def messages(self) -> list[str]:
        """Return the messages in the order of their lines in the file."""
        return [text for _, text in sorted(self._found, key=lambda item: item[0])]


def format_key(key: Key) -> str:
    """Format a key path as TOML writes it, such as `projects."my app".env`."""
    return ".".join(
        part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else quote_string(part)
        for part in key
    )


Checker = Callable[[Problems, Key, object], object | None]


def check_table(
    problems: Problems, key: Key, value: object, *, secret: bool = False
) -> dict[str, object] | None:
    if isinstance(value, dict):
        return value
    got = type_name(value) if secret else describe_value(value)
    problems.add(key, f"expected a table, got {got}.")
    return None


# Checkers of single values


def string_checker(*, allow_empty: bool = True) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> str | None:
        return check_string(problems, key, value, allow_empty=allow_empty)

    return check


def check_string(
    problems: Problems, key: Key, value: object, *, allow_empty: bool = False
) -> str | None:
    if not isinstance(value, str):
        problems.add(key, f"expected a string, got {describe_value(value)}.")
        return None
    if not allow_empty and not value.strip():
        problems.add(key, "must not be empty.")
        return None
    if "\0" in value:
        problems.add(key, "must not contain a NUL character.")
        return None
    return value


def check_command(problems: Problems, key: Key, value: object) -> str | None:
    command = check_string(problems, key, value)
    if command is None:
        return None
    try:
        shlex.split(command)
    except ValueError as error:
        problems.add(
            key,
            f"invalid command {quote_string(command)}: {error}. Commands are split "
            "into words like a shell does, so quotes must be balanced.",
        )
        return None
    return command


def check_boolean(problems: Problems, key: Key, value: object) -> bool | None:
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {describe_value(value)}.")
        return None
    return value


def integer_checker(minimum: int, maximum: int | None = None) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(key, f"expected an integer, got {describe_value(value)}.")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = (
                f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            )
            problems.add(key, f"expected an integer {allowed}, got {value}.")
            return None
        return value

    return check


def number_checker(minimum: float) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.add(key, f"expected a number, got {describe_value(value)}.")
            return None
        if not math.isfinite(value) or value < minimum:
            problems.add(key, f"expected a number >= {minimum:g}, got {value}.")
            return None
        return float(value)

    return check


def duration_checker(*, maximum: float, positive: bool = False) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            problems.add(
                key,
                f"expected a duration, got {describe_value(value)}: {DURATION_HELP}.",
            )
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            problems.add(key, f"invalid duration {show_value(value)}: {DURATION_HELP}.")
            return None
        too_small = seconds <= 0 if positive else seconds < 0
        if too_small or seconds > maximum:
            limit = format_duration_limit(maximum)
            allowed = (
                f"greater than 0 and at most {limit}"
                if positive
                else f"from 0 to {limit}"
            )
            problems.add(
                key, f"expected a duration {allowed}, got {show_value(value)}."
            )
            return None
        return seconds

    return check


def size_checker(*, maximum: int) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int | str):
            problems.add(
                key, f"expected a size, got {describe_value(value)}: {SIZE_HELP}."
            )
            return None
        try:
            size = parse_size(value)
        except ValueError:
            problems.add(key, f"invalid size {show_value(value)}: {SIZE_HELP}.")
            return None
        if not 1 <= size <= maximum:
            problems.add(
                key,
                f"expected a size from 1 byte to {format_size(maximum)}, "
                f"got {show_value(value)}.",
            )
            return None
        return size

    return check


def format_duration_limit(seconds: float) -> str:
    """Format a limit in whole days when it is one, such as "30d", because
    format_duration would write "720h"."""
    days, rest = divmod(seconds, 86400)
    if days and not rest:
        return f"{days:g}d"
    return format_duration(seconds)


def choice_checker(allowed: tuple[str, ...]) -> Checker:
    def check(problems: Problems, key: Key, value: object) -> str | None:
        if value not in allowed:
            problems.add(
                key,
                f"invalid value {show_value(value)}: "
                f"expected one of {quote_all(allowed)}.",
            )
            return None
        return str(value)

    return check


def check_timezone(problems: Problems, key: Key, value: object) -> str | None:
    name = check_string(problems, key, value)
    if name is None:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    # ZoneInfo raises IsADirectoryError for a folder of zones such as "Europe".
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        known = _zone_with_other_case(name)
        hint = (
            f'Did you mean "{known}"?'
            if known
            else 'Expected an IANA time zone name such as "Europe/Paris" or "UTC".'
        )
        problems.add(
            key,
            f"unknown time zone {quote_string(name)}. {hint} Leave the key out "
            "to use local time.",
        )
        return None
    return name


def _zone_with_other_case(name: str) -> str | None:
    """Return the time zone whose name differs from `name` only in case."""
    folded = name.casefold()
    for zone in zoneinfo.available_timezones():
        if zone.casefold() == folded:
            return zone
    return None


def check_stop_signal(problems: Problems, key: Key, value: object) -> str | None:
    text = check_string(problems, key, value)
    if text is None:
        return None
    name = text.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name in _UNCATCHABLE_SIGNALS:
        problems.add(
            key,
            f"{name} cannot be caught, so a run would get no chance to stop "
            "cleanly. Use SIGTERM or SIGINT, because runvisor sends SIGKILL "
            "itself once stop_timeout has passed.",
        )
        return None
    if name not in signal.Signals.__members__:
        problems.add(
            key,
            f"unknown signal {quote_string(text)}: expected a signal name such as "
            '"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1" or "SIGUSR2".',
        )
        return None
    return name


def check_exit_codes(problems: Problems, key: Key, value: object) -> list[int] | None:
    if not isinstance(value, list):
        problems.add(
            key,
            "expected an array of exit codes such as [0, 2], "
            f"got {describe_value(value)}.",
        )
        return None
    if not value:
        problems.add(key, "must list at least one exit code, such as [0].")
        return None
    codes: set[int] = set()
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            problems.add(
                key,
                f"invalid exit code {show_value(code)}: "
                "expected integers from 0 to 255.",
            )
            return None
        codes.add(code)
    # Sorted, so that [0, 2] and [2, 0] compare equal on reload.
    return sorted(codes)


def check_http_url(problems: Problems, key: Key, value: object) -> str | None:
    url = check_string(problems, key, value)
    if url is None:
        return None
    parts = urlsplit(url)
    reason = None
    if parts.scheme.lower() == "https":
        reason = (
            "https is not supported, because the HTTP probe speaks plain HTTP "
            "without TLS. Probe an http:// address, or use an exec probe such as "
            'exec = "curl -fsS https://..."'
        )
    elif parts.scheme.lower() != "http":
        reason = 'expected an http:// URL such as "http://127.0.0.1:8080/healthz"'
    elif not parts.hostname:
        reason = "the URL has no host"
    elif re.search(r"[\s\x00-\x1f\x7f]", url):
        reason = "the URL contains whitespace or control characters"
    elif not url.isascii():
        reason = "the URL contains non-ASCII characters; percent-encode them"
    elif "@" in parts.netloc:
        # Show the URL without its user info, which may hold a password.
        url = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
        reason = (
            "user names and passwords in the URL are not supported, because the "
            "URL appears in probe errors, events and history. Send credentials "
            "from an exec probe script instead"
        )
    else:
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            reason = "the port must be an integer from 1 to 65535"
    if reason is not None:
        problems.add(key, f"invalid URL {quote_string(url)}: {reason}.")
        return None
    return url


def check_tcp_address(problems: Problems, key: Key, value: object) -> str | None:
    address = check_string(problems, key, value)
    if address is None:
        return None
    host, colon, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    valid_port = re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535
    if not colon or not host or not valid_port:
        problems.add(
            key,
            f'invalid address {quote_string(address)}: expected "host:port" with a '
            'port from 1 to 65535, such as "127.0.0.1:5432" or "[::1]:5432".',
        )
        return None
    return address


# Message helpers


def type_name(value: object) -> str:
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a float"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "a table"
        case datetime():
            return "a date-time"
        case date():
            return "a date"
        case time():
            return "a time"
    return type(value).__name__


def describe_value(value: object) -> str:
    """Name the TOML type of a value and show the value when it is short."""
    if isinstance(value, dict | list):
        return type_name(value)
    return f"{type_name(value)} ({show_value(value)})"


def show_value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = quote_string(value)
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def quote_string(text: str) -> str:
    """Quote a string like a TOML basic string. Control characters are
    escaped, so that a message stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def quote_all(values: Iterable[str]) -> str:
    return ", ".join(f'"{value}"' for value in values)
