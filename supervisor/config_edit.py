"""`config set`: change one key of the config file in place.

The file is edited with tomlkit, so comments, blank lines and the order of
keys stay as they were. The edited text is validated by the config loader
before anything is written. The write is atomic (a temporary file in the
same folder, then a rename), so the file is either the old one or the new
one, never half written. An invalid value leaves the file untouched.

Keys are written `NAME.KEY`, where NAME is a project (`web.restart`,
`web.backoff.initial`, `web.env.LOG_LEVEL`) or, when no project has that
name, the `runvisor` or `credentials` table (`runvisor.log_level`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.container import Container
from tomlkit.items import AoT, InlineTable, Table

from supervisor.config import Config, parse_config
from supervisor.errors import ConfigError

_TOP_TABLES = ("runvisor", "credentials")


@dataclass(frozen=True)
class ConfigChange:
    path: Path
    key: str
    old: object | None
    new: object
    config: Config


def parse_value(text: str) -> object:
    """Read a command-line value as a TOML value (`5`, `true`, `[0, 3]`,
    `"quoted"`), or as a plain string when it is not valid TOML (`2s`,
    `on-failure`)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def set_value(
    path: Path,
    dotted_key: str,
    raw_value: str,
    before_write: Callable[[ConfigChange], None] | None = None,
) -> ConfigChange:
    """Set `dotted_key` to `raw_value` in the config file at `path`.

    `before_write` is called with the validated change before the file is
    written, and may reject it by raising.

    Raises:
        ConfigError: the key does not name a project key or table, the
            value is a secret literal, or the edited file would be invalid.
            The file is unchanged then.
    """
    real_path = Path(os.path.realpath(path))
    try:
        text = real_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"Cannot read the config file {path}: {error}."]) from None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as error:
        raise ConfigError(
            [f"{path}: the file is not valid TOML ({error}); fix it first."]
        ) from None

    table, parts = _locate(document, dotted_key, path)
    value = parse_value(raw_value)
    old = _assign(table, parts, value, dotted_key)
    new_text = tomlkit.dumps(document)

    try:
        config = parse_config(new_text, path)
    except ConfigError as error:
        raise ConfigError(
            [
                f"{dotted_key} = {_show(value)} is not valid, so {path} is unchanged:",
                *error.problems,
            ]
        ) from None
    change = ConfigChange(path=path, key=dotted_key, old=old, new=value, config=config)
    if before_write is not None:
        before_write(change)
    write_atomically(real_path, new_text)
    return change


def _locate(
    document: tomlkit.TOMLDocument, dotted_key: str, path: Path
) -> tuple[Container | Table | InlineTable, list[str]]:
    """Return the table that the key's first part names, and the rest of
    the key. Project names may contain dots, so the longest matching project
    name wins."""
    projects = document.get("projects")
    names = list(projects.keys()) if isinstance(projects, Table | InlineTable) else []
    for name in sorted(names, key=len, reverse=True):
        if dotted_key.startswith(name + "."):
            rest = dotted_key[len(name) + 1 :]
            assert isinstance(projects, Table | InlineTable)
            project = projects[name]
            if isinstance(project, Table | InlineTable) and rest:
                return project, rest.split(".")
    first, _, rest = dotted_key.partition(".")
    if first in _TOP_TABLES and rest:
        table = document.get(first)
        if table is None:
            table = tomlkit.table()
            document[first] = table
        if isinstance(table, Table | InlineTable):
            return table, rest.split(".")
    raise ConfigError(
        [
            f"{dotted_key!r} does not name a key of a project in {path}. Write "
            "NAME.KEY, such as web.restart or web.backoff.initial, where NAME "
            "is a project of the file (or 'runvisor' or 'credentials')."
        ]
    )


def _assign(
    table: Container | Table | InlineTable, parts: list[str], value: object, key: str
) -> object | None:
    if any(not part for part in parts):
        raise ConfigError([f"{key!r} has an empty part between dots."])
    if _is_secret(parts, value):
        raise ConfigError(
            [
                f"{key} is a secret literal. It is not set from the command "
                "line, where it would show in the process list and the shell "
                "history: edit the file, or store it with 'runvisor creds add' "
                'and map it with { credential = "NAME" }.'
            ]
        )
    *tables, last = parts
    current: Any = table
    for index, part in enumerate(tables):
        child = current.get(part)
        if child is None:
            # A missing table is written as a dotted key (`backoff.initial = 2`)
            # inside the existing table, so no new [header] appears.
            current.add(tomlkit.key([*tables[index:], last]), value)
            return None
        if isinstance(child, AoT) or not isinstance(child, Table | InlineTable):
            table_key = ".".join(parts[: index + 1])
            raise ConfigError([f"{table_key} is not a table, so {key} cannot be set."])
        current = child
    old = current.get(last)
    if isinstance(old, Table | InlineTable | AoT):
        raise ConfigError(
            [f"{key} is a table; set one of its keys, such as {key}.NAME."]
        )
    current[last] = value
    return None if old is None else _plain(old)


def _is_secret(parts: list[str], value: object) -> bool:
    """Tell whether the assignment writes a `{ value = "..." }` secret literal."""
    if parts[0] != "env":
        return False
    if len(parts) >= 3 and parts[-1] == "value":
        return True
    return isinstance(value, dict) and "value" in value


def _plain(item: object) -> object:
    unwrap = getattr(item, "unwrap", None)
    return unwrap() if unwrap is not None else item


def _show(value: object) -> str:
    return tomlkit.item(value).as_string()


def write_atomically(path: Path, text: str) -> None:
    """Replace the file at `path` with `text`, keeping its mode: write a
    temporary file in the same folder, flush it to disk, then rename it."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
