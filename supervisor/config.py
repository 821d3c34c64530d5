"""The config file: finding it, loading it with file/line/key errors, and
comparing two versions of it.

One TOML file describes the daemon (`[runvisor]`), the credential backend
(`[credentials]`) and each project (`[projects.NAME]`). `config.example.toml`
lists every key with its default. Loading takes three steps:

1. `tomllib` parses the text. A syntax error keeps tomllib's line and column.
2. `config_checks` checks every key and collects every problem, each with the
   line that defines the key, so one run shows all of them.
3. msgspec decodes the checked tables once into the frozen Structs of
   `config_schema`, which this module re-exports.

A file without any key is an error, because an empty file on reload is far
more often a mistake than a wish to stop every project. A file whose only
content is an empty `[projects]` table (or `[runvisor]` settings) is valid,
and `check_config` warns that it configures no projects.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import msgspec

from supervisor.config_checks import MODE_KEYS, check_tables
from supervisor.config_schema import (
    Backoff,
    Config,
    ConfigDiff,
    CredentialRef,
    CredentialSettings,
    DaemonSettings,
    EnvValue,
    HealthConfig,
    ProjectConfig,
    SecretValue,
)
from supervisor.config_values import Problems
from supervisor.errors import ConfigError
from supervisor.model import TriggerMode
from supervisor.paths import (
    find_config_path,
)
from supervisor.toml_lines import KeyLines
from supervisor.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "MIN_MASKED_SECRET_LENGTH",
    "Backoff",
    "Config",
    "ConfigDiff",
    "CredentialRef",
    "CredentialSettings",
    "DaemonSettings",
    "EnvValue",
    "HealthConfig",
    "ProjectConfig",
    "SecretValue",
    "check_config",
    "diff_configs",
    "effective_settings",
    "find_config_path",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


# Secrets shorter than this are not masked in output, because masking every
# occurrence of a 1 to 3 character string would blank out ordinary text.
MIN_MASKED_SECRET_LENGTH = 4

# Linux stores a Unix socket path in sun_path, 108 bytes with the final NUL.
_MAX_SOCKET_PATH_BYTES = 107

_SYNTAX_ERROR_LINE = re.compile(r"at line (\d+), column \d+")


def load_config(path: Path) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: the file cannot be read or is invalid. Its `problems`
            list every problem found, each as `FILE:LINE: KEY: message`.
    """
    config, _ = _parse(_read_text(path), path)
    return config


def parse_config(text: str, source: Path) -> Config:
    """Validate config text as if it had been read from `source`.

    Relative paths in the text resolve against the folder of `source`.

    Raises:
        ConfigError: the text is invalid, with every problem found.
    """
    config, _ = _parse(text, source)
    return config


def check_config(path: Path) -> tuple[Config | None, list[str], list[str]]:
    """Validate a config file and return `(config, errors, warnings)`.

    `config` is None when there are errors. Warnings are computed only for a
    valid file. They cover what is allowed but probably not intended:
    no projects, a project folder or program that does not exist (yet), a
    secret literal too short to be masked, and a socket path too long to bind.
    """
    try:
        text = _read_text(path)
        config, lines = _parse(text, path)
    except ConfigError as error:
        return None, error.problems, []

    warnings = Problems(config.source, lines)
    if not config.projects:
        warnings.add(
            ("projects",),
            "no projects are configured, so the daemon has nothing to run. "
            "Add a [projects.NAME] table for each project.",
        )
    socket_bytes = len(os.fsencode(config.runvisor.socket))
    if socket_bytes > _MAX_SOCKET_PATH_BYTES:
        warnings.add(
            ("runvisor", "socket"),
            f"the socket path {config.runvisor.socket} is {socket_bytes} bytes "
            f"long, but a Unix socket path has at most {_MAX_SOCKET_PATH_BYTES}, "
            "so the daemon cannot listen on it. Set a shorter 'socket'.",
        )
    for project in config.projects.values():
        _warn_about_project(warnings, project)
    _warn_about_shared_folders(warnings, config)
    _warn_about_readable_secrets(warnings, config, path)
    return config, [], warnings.messages()


def _warn_about_readable_secrets(
    warnings: Problems, config: Config, path: Path
) -> None:
    """Warn when a config that contains secret literals is readable by others."""
    literals = [
        (project.name, name)
        for project in config.projects.values()
        for name, value in project.env.items()
        if isinstance(value, SecretValue)
    ]
    if not literals:
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        project, name = literals[0]
        warnings.add(
            ("projects", project, "env", name),
            f"the config file contains secret literals but has mode {mode:04o}, so "
            f"other users may read them. Run 'chmod 600 {path}'.",
        )


def _warn_about_shared_folders(warnings: Problems, config: Config) -> None:
    """Warn about projects that share a folder while one of them maps
    variables: each run rewrites and then removes the folder's `.env.local`."""
    by_folder: dict[str, list[ProjectConfig]] = {}
    for project in config.projects.values():
        folder = os.path.realpath(os.path.expanduser(project.path))
        by_folder.setdefault(folder, []).append(project)
    for folder, projects in by_folder.items():
        if len(projects) < 2 or not any(project.env for project in projects):
            continue
        names = ", ".join(repr(project.name) for project in projects)
        for project in projects:
            warnings.add(
                ("projects", project.name, "path"),
                f"projects {names} share the folder {folder}, so their runs "
                "overwrite and remove each other's .env.local and can read "
                "each other's variables (each run masks the secrets of all "
                "of them). Give each project its own folder.",
            )


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Sort the projects of two configs by what a reload does to them.

    Projects compare by value, so the order of the file, its mtime and its
    path do not matter. Names keep the order of the new file, and removed
    names the order of the old one.
    """
    added = [name for name in new.projects if name not in old.projects]
    removed = [name for name in old.projects if name not in new.projects]
    changed: list[str] = []
    unchanged: list[str] = []
    for name, project in new.projects.items():
        if name in old.projects:
            same = old.projects[name] == project
            (unchanged if same else changed).append(name)

    return ConfigDiff(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        settings_changed=(
            old.runvisor != new.runvisor or old.credentials != new.credentials
        ),
    )


def effective_settings(project: ProjectConfig) -> dict[str, object]:
    """Return the settings of a project with every default filled in.

    Only the keys that apply to the project's trigger mode are included.
    Durations are formatted as in the file ("1m30s"), and every secret
    literal is replaced by "***". The result encodes to JSON as it is.
    """
    settings: dict[str, object] = {}
    for field in msgspec.structs.fields(ProjectConfig):
        if project.trigger not in MODE_KEYS.get(field.name, tuple(TriggerMode)):
            continue
        value = getattr(project, field.name)
        if field.name == "env":
            value = {name: _show_env_value(item) for name, item in value.items()}
        elif field.name in _DURATION_FIELDS and value is not None:
            value = format_duration(value)
        elif isinstance(value, Backoff | HealthConfig):
            value = _show_struct(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        settings[field.name] = value
    return settings


# Loading


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: config file not found. Create it (config.example.toml "
                "lists every key), or pass --config PATH."
            ]
        ) from None
    except OSError as error:
        raise ConfigError(
            [f"{path}: could not read the config file: {error.strerror}."]
        ) from None

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            [
                f"{path}:{line}: invalid UTF-8 at byte {error.start}. Save the "
                "file as UTF-8, which TOML requires."
            ]
        ) from None


def _parse(text: str, source: Path) -> tuple[Config, KeyLines]:
    source = Path(os.path.abspath(source))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, error)]) from None

    lines = KeyLines(text)
    problems = Problems(str(source), lines)
    if not data:
        problems.add(
            (),
            "the config file is empty. Add a [projects.NAME] table for each "
            "project, or an empty [projects] table to run the daemon with no "
            "projects.",
            line=1,
        )
    tables = check_tables(data, source.parent, problems)
    if problems:
        raise ConfigError(problems.messages())

    try:
        config = msgspec.convert({"source": str(source), **tables}, Config)
    except msgspec.ValidationError as error:
        # The checks above accept only what decodes, so this is a bug in
        # them. It is still reported as an invalid file, which a reload
        # handles, instead of an exception that could stop the daemon.
        raise ConfigError([f"{source}: {error}"]) from None
    return config, lines


def _syntax_problem(source: Path, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    match = _SYNTAX_ERROR_LINE.search(message)
    line = int(match[1]) if match else max(1, len(text.splitlines()))
    hint = ""
    if message.startswith("Illegal character '\\n'"):
        hint = " A string may be missing its closing quote."
    elif message.startswith("Cannot declare"):
        hint = " Each table, such as [projects.NAME], may appear only once."
    return f"{source}:{line}: invalid TOML: {message}.{hint}"


# Warnings


def _warn_about_project(warnings: Problems, project: ProjectConfig) -> None:
    key = ("projects", project.name)
    for name, value in project.env.items():
        if (
            isinstance(value, SecretValue)
            and len(value.value) < MIN_MASKED_SECRET_LENGTH
        ):
            warnings.add(
                (*key, "env", name),
                f"the secret literal is shorter than {MIN_MASKED_SECRET_LENGTH} "
                "characters, so it is not masked in output. Use a longer secret.",
            )

    folder = Path(project.path)
    if not folder.is_dir():
        warnings.add(
            (*key, "path"),
            f"the project folder {project.path} does not exist, so runs will "
            "fail until it is created.",
        )
        return

    program = shlex.split(project.command)[0]
    if "/" in program:
        program_path = folder / os.path.expanduser(program)
        if not program_path.is_file():
            problem = f"{program_path} does not exist"
        elif not os.access(program_path, os.X_OK):
            problem = f"{program_path} is not executable (run 'chmod +x {program}')"
        else:
            return
    elif shutil.which(program) is None:
        problem = f"{program!r} is not found on PATH"
    else:
        return
    warnings.add((*key, "command"), f"{problem}, so runs will fail until it is fixed.")


# Effective settings

_DURATION_FIELDS = frozenset(
    {
        "jitter",
        "prestart",
        "timeout",
        "start_seconds",
        "restart_window",
        "stop_timeout",
        "initial",
        "max",
        "reset_after",
        "interval",
        "start_period",
    }
)


def _show_env_value(value: EnvValue) -> object:
    if isinstance(value, SecretValue):
        return "***"
    if isinstance(value, CredentialRef):
        return {"credential": value.credential}
    return value


def _show_struct(value: Backoff | HealthConfig) -> dict[str, object]:
    shown: dict[str, object] = {}
    for name, item in msgspec.structs.asdict(value).items():
        if item is None:
            continue
        if name in _DURATION_FIELDS:
            item = format_duration(item)
        elif isinstance(item, enum.Enum):
            item = item.value
        shown[name] = item
    return shown
