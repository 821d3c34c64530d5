"""Checks of a parsed config file that collect every problem with its line.

`check_tables` walks the dicts that `tomllib` returns, table by table and key
by key. Each key has a checker from `config_values`, which reports what is
wrong and returns the value in the form that `Config` decodes. Checks that
involve several keys (trigger-specific keys, the cron expression with its
time zone, backoff limits, the one health probe) run after the keys of a
table, and paths become absolute here.

Messages never contain the value of an `env` entry, because such values may
be secrets.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

import platformdirs

from supervisor.config_schema import Backoff, CredentialBackend, LogLevel
from supervisor.config_values import (
    Checker,
    Problems,
    check_boolean,
    check_command,
    check_exit_codes,
    check_http_url,
    check_stop_signal,
    check_string,
    check_table,
    check_tcp_address,
    check_timezone,
    choice_checker,
    duration_checker,
    integer_checker,
    number_checker,
    quote_all,
    quote_string,
    size_checker,
    string_checker,
    type_name,
)
from supervisor.cron import CronSchedule
from supervisor.errors import CronError
from supervisor.model import OnUnhealthy, OverlapPolicy, RestartPolicy, TriggerMode
from supervisor.toml_lines import Key

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_ENV_PREFIX = "RUNVISOR_"

_NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"

# Upper limits of numbers in the file. A value past them is a typo rather
# than a setting, and it would break what uses it: a stop timeout of 1e300
# seconds never ends, and status would print its 300 digits.
DAY = 86400.0
MAX_DURATION = 30 * DAY
# Run timeouts, the restart window and the backoff reset may be a year.
MAX_LONG_DURATION = 365 * DAY
MAX_JITTER = DAY
MAX_PRESTART = 60.0
MAX_COUNT = 1_000_000
MAX_LOG_BYTES = 1024**4


def check_tables(
    data: Mapping[str, object], folder: Path, problems: Problems
) -> dict[str, object]:
    """Check a parsed config file and return it in the form `Config` decodes.

    `folder` is the config file's folder, which relative paths resolve
    against. The result is complete only when `problems` stays empty.
    """
    for name in data:
        if name not in ("runvisor", "credentials", "projects"):
            _unknown_key(problems, (name,), ("runvisor", "credentials", "projects"))

    daemon = _check_daemon(problems, data.get("runvisor", {}), folder)
    credentials = check_table(problems, ("credentials",), data.get("credentials", {}))
    credential_settings = _check_keys(
        problems, ("credentials",), credentials or {}, _CREDENTIAL_CHECKERS
    )

    projects: dict[str, object] = {}
    folded_names: dict[str, str] = {}
    project_tables = check_table(problems, ("projects",), data.get("projects", {}))
    for name, table in (project_tables or {}).items():
        project = _check_project(problems, name, table, folder)
        if project is not None:
            projects[name] = project

        # Each name is a folder under logs/, and "Web" and "web" would be one
        # folder on a case-insensitive file system such as macOS's default.
        other = folded_names.setdefault(name.casefold(), name)
        if other != name:
            problems.add(
                ("projects", name),
                f"the project name differs from {quote_string(other)} only in "
                "letter case, so both would share one log folder on a "
                "case-insensitive file system. Rename one of them.",
            )

    return {
        "runvisor": daemon,
        "credentials": credential_settings,
        "projects": projects,
    }


def resolve_path(folder: Path, path: str) -> str:
    """Make a path from the config absolute: `~` expands, relative paths
    resolve against the config file's folder, and symlinks stay as written."""
    return os.path.normpath(folder / os.path.expanduser(path))


def default_socket(data_dir: str) -> str:
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "runvisor", "control.sock")
    return os.path.join(data_dir, "control.sock")


# Tables


def _check_daemon(problems: Problems, value: object, folder: Path) -> dict[str, object]:
    table = check_table(problems, ("runvisor",), value) or {}
    settings = _check_keys(problems, ("runvisor",), table, _DAEMON_CHECKERS)

    data_dir = str(settings.get("data_dir") or platformdirs.user_data_dir("runvisor"))
    settings["data_dir"] = resolve_path(folder, data_dir)
    if "socket" in settings:
        settings["socket"] = resolve_path(folder, str(settings["socket"]))
    else:
        settings["socket"] = default_socket(str(settings["data_dir"]))
    return settings


def _check_project(
    problems: Problems, name: str, value: object, folder: Path
) -> dict[str, object] | None:
    key = ("projects", name)
    if not NAME_PATTERN.fullmatch(name):
        problems.add(
            key,
            f"invalid project name {quote_string(name)}: a name is {_NAME_RULE}, "
            "because it becomes a folder name under logs/.",
        )
    table = check_table(problems, key, value)
    if table is None:
        return None

    if "name" in table:
        problems.add(
            (*key, "name"),
            "the project name comes from the table header [projects.NAME], "
            "so it cannot be set as a key. Remove this key.",
        )
        table = {field: item for field, item in table.items() if field != "name"}
    project = _check_keys(problems, key, table, _PROJECT_CHECKERS)

    trigger = project.get("trigger")
    if "trigger" not in table:
        problems.add(
            key,
            "missing required key 'trigger': expected one of "
            f"{quote_all(TriggerMode)}.",
        )
    if isinstance(trigger, str):
        _check_mode_keys(problems, key, table, TriggerMode(trigger))
    if trigger == TriggerMode.SCHEDULE:
        _check_schedule(problems, key, table, project)
    backoff = project.get("backoff")
    if isinstance(backoff, dict):
        _check_backoff_limits(problems, (*key, "backoff"), backoff)

    project["name"] = name
    project["path"] = resolve_path(folder, str(project.get("path", name)))
    return project


# Trigger modes that may set each mode-specific key. Keys not listed here
# apply to every mode.
MODE_KEYS: dict[str, tuple[TriggerMode, ...]] = {
    "cron": (TriggerMode.SCHEDULE,),
    "timezone": (TriggerMode.SCHEDULE,),
    "catch_up": (TriggerMode.SCHEDULE,),
    "jitter": (TriggerMode.SCHEDULE,),
    "prestart": (TriggerMode.SCHEDULE,),
    "overlap": (TriggerMode.MANUAL, TriggerMode.SCHEDULE),
    "timeout": (TriggerMode.MANUAL, TriggerMode.SCHEDULE),
    "restart": (TriggerMode.ALWAYS_RUNNING,),
    "success_exit_codes": (TriggerMode.ALWAYS_RUNNING,),
    "start_seconds": (TriggerMode.ALWAYS_RUNNING,),
    "backoff": (TriggerMode.ALWAYS_RUNNING,),
    "max_retries": (TriggerMode.ALWAYS_RUNNING,),
    "restart_limit": (TriggerMode.ALWAYS_RUNNING,),
    "restart_window": (TriggerMode.ALWAYS_RUNNING,),
    "health": (TriggerMode.ALWAYS_RUNNING,),
}


def _check_mode_keys(
    problems: Problems, key: Key, table: Mapping[str, object], trigger: TriggerMode
) -> None:
    for field in table:
        modes = MODE_KEYS.get(field)
        if modes is None or trigger in modes:
            continue
        allowed = " or ".join(f'"{mode}"' for mode in modes)
        problems.add(
            (*key, field),
            f"'{field}' applies only to trigger = {allowed}, but this project has "
            f'trigger = "{trigger}". Remove the key or change the trigger.',
        )


def _check_schedule(
    problems: Problems,
    key: Key,
    table: Mapping[str, object],
    project: Mapping[str, object],
) -> None:
    if "cron" not in table:
        problems.add(
            key,
            "missing required key 'cron': trigger = \"schedule\" needs a cron "
            'expression such as cron = "*/5 * * * *".',
        )
        return
    expression = project.get("cron")
    if not isinstance(expression, str):
        return

    # An invalid time zone has its own message, so the expression is then
    # checked in local time.
    timezone = project.get("timezone")
    try:
        CronSchedule(expression, timezone if isinstance(timezone, str) else None)
    except CronError as error:
        reason = str(error).rstrip(".")
        problems.add(
            (*key, "cron"),
            f"invalid cron expression {expression!r}: {reason}.",
        )


def _check_backoff_limits(
    problems: Problems, key: Key, backoff: Mapping[str, object]
) -> None:
    defaults = Backoff()
    initial = backoff.get("initial", defaults.initial)
    maximum = backoff.get("max", defaults.max)
    if isinstance(initial, float) and isinstance(maximum, float) and maximum < initial:
        problems.add(
            (*key, "max"),
            f"expected a duration >= initial ({initial:g}s), got {maximum:g}s.",
        )


def _check_keys(
    problems: Problems,
    key: Key,
    table: Mapping[str, object],
    checkers: Mapping[str, Checker],
) -> dict[str, object]:
    """Check each key of a table with its checker and return the valid values."""
    values: dict[str, object] = {}
    for field, value in table.items():
        checker = checkers.get(field)
        if checker is None:
            _unknown_key(problems, (*key, field), tuple(checkers))
            continue
        result = checker(problems, (*key, field), value)
        if result is not None:
            values[field] = result
    return values


def _unknown_key(problems: Problems, key: Key, allowed: tuple[str, ...]) -> None:
    name = key[-1]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    problems.add(
        key, f"unknown key '{name}'.{hint} Allowed keys: {', '.join(allowed)}."
    )


def _backoff(problems: Problems, key: Key, value: object) -> dict[str, object] | None:
    table = check_table(problems, key, value)
    if table is None:
        return None
    return _check_keys(problems, key, table, _BACKOFF_CHECKERS)


def _health(problems: Problems, key: Key, value: object) -> dict[str, object] | None:
    table = check_table(problems, key, value)
    if table is None:
        return None
    health = _check_keys(problems, key, table, _HEALTH_CHECKERS)

    probes = [probe for probe in ("exec", "http", "tcp") if probe in table]
    if len(probes) != 1:
        found = "none" if not probes else " and ".join(f"'{probe}'" for probe in probes)
        problems.add(
            key,
            f"expected exactly one probe, 'exec', 'http' or 'tcp', found {found}.",
        )
    return health


def _env(problems: Problems, key: Key, value: object) -> dict[str, object] | None:
    table = check_table(problems, key, value, secret=True)
    if table is None:
        return None
    env: dict[str, object] = {}
    for name, mapping in table.items():
        entry = _env_entry(problems, (*key, name), mapping)
        if entry is not None:
            env[name] = entry
    return env


def _env_entry(problems: Problems, key: Key, value: object) -> object | None:
    # Values are never quoted in messages, because they may be secrets.
    name = key[-1]
    valid = True
    if not ENV_NAME_PATTERN.fullmatch(name):
        problems.add(
            key,
            f"invalid variable name {quote_string(name)}: a name is letters, digits "
            "and '_', and does not start with a digit.",
        )
        valid = False
    elif name.startswith(RESERVED_ENV_PREFIX):
        problems.add(
            key,
            f"variable names starting with {RESERVED_ENV_PREFIX} are reserved for "
            "the variables runvisor sets, such as RUNVISOR_PROJECT. Rename it.",
        )
        valid = False

    form = 'a string, { credential = "NICKNAME" } or { value = "SECRET" }'
    if isinstance(value, str):
        if "\0" in value:
            problems.add(
                key,
                "the value contains a NUL character, which an "
                "environment variable cannot hold.",
            )
            return None
        return value if valid else None
    if not isinstance(value, dict) or len(value) != 1:
        got = (
            "a table with several keys" if isinstance(value, dict) else type_name(value)
        )
        problems.add(key, f"expected {form}, got {got}.")
        return None

    [(kind, inner)] = value.items()
    if kind == "credential":
        nickname = check_string(problems, (*key, kind), inner)
        if nickname is not None and not NAME_PATTERN.fullmatch(nickname):
            problems.add(
                (*key, kind),
                f"invalid credential nickname {quote_string(nickname)}: a nickname "
                f"is {_NAME_RULE}.",
            )
            return None
        if nickname is None or not valid:
            return None
        return {"kind": "credential", "credential": nickname}
    if kind == "value":
        if not isinstance(inner, str):
            problems.add((*key, kind), f"expected a string, got {type_name(inner)}.")
            return None
        if "\0" in inner:
            problems.add(
                (*key, kind),
                "the secret contains a NUL character, "
                "which an environment variable cannot hold.",
            )
            return None
        return {"kind": "value", "value": inner} if valid else None
    problems.add((*key, kind), f"unknown key '{kind}': expected {form}.")
    return None


# Key tables. Their keys are the field names of the Structs in config_schema,
# in the same order, which a test checks.

_DAEMON_CHECKERS: dict[str, Checker] = {
    "data_dir": string_checker(allow_empty=False),
    "socket": string_checker(allow_empty=False),
    "log_max_bytes": size_checker(maximum=MAX_LOG_BYTES),
    "log_backups": integer_checker(0, MAX_COUNT),
    "history_keep": integer_checker(1, MAX_COUNT),
    "log_level": choice_checker(get_args(LogLevel)),
}

_CREDENTIAL_CHECKERS: dict[str, Checker] = {
    "backend": choice_checker(get_args(CredentialBackend)),
}

_BACKOFF_CHECKERS: dict[str, Checker] = {
    "initial": duration_checker(maximum=MAX_DURATION, positive=True),
    "factor": number_checker(1.0),
    "max": duration_checker(maximum=MAX_DURATION, positive=True),
    "reset_after": duration_checker(maximum=MAX_LONG_DURATION),
}

_HEALTH_CHECKERS: dict[str, Checker] = {
    "exec": check_command,
    "http": check_http_url,
    "tcp": check_tcp_address,
    "interval": duration_checker(maximum=MAX_DURATION, positive=True),
    "timeout": duration_checker(maximum=MAX_DURATION, positive=True),
    "start_period": duration_checker(maximum=MAX_DURATION),
    "failure_threshold": integer_checker(1, MAX_COUNT),
    "success_threshold": integer_checker(1, MAX_COUNT),
    "on_unhealthy": choice_checker(tuple(OnUnhealthy)),
}

_PROJECT_CHECKERS: dict[str, Checker] = {
    "path": string_checker(allow_empty=False),
    "command": check_command,
    "trigger": choice_checker(tuple(TriggerMode)),
    "description": string_checker(),
    "cron": string_checker(allow_empty=False),
    "timezone": check_timezone,
    "catch_up": check_boolean,
    "jitter": duration_checker(maximum=MAX_JITTER),
    "prestart": duration_checker(maximum=MAX_PRESTART),
    "overlap": choice_checker(tuple(OverlapPolicy)),
    "timeout": duration_checker(maximum=MAX_LONG_DURATION, positive=True),
    "restart": choice_checker(tuple(RestartPolicy)),
    "success_exit_codes": check_exit_codes,
    "start_seconds": duration_checker(maximum=MAX_DURATION),
    "backoff": _backoff,
    "max_retries": integer_checker(0, MAX_COUNT),
    "restart_limit": integer_checker(1, MAX_COUNT),
    "restart_window": duration_checker(maximum=MAX_LONG_DURATION, positive=True),
    "health": _health,
    "stop_signal": check_stop_signal,
    "stop_timeout": duration_checker(maximum=MAX_DURATION),
    "env": _env,
    "keep_env_file": check_boolean,
}
