"""Tests of config loading, validation messages, warnings and diffs.

Every test writes a real TOML file into a temporary folder and loads it the
way the daemon does. Cron expressions are checked by the real scheduler.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
import tomllib
from pathlib import Path

import msgspec
import pytest

from supervisor import config_checks, config_values, paths
from supervisor.config import (
    Backoff,
    Config,
    CredentialRef,
    CredentialSettings,
    DaemonSettings,
    HealthConfig,
    ProjectConfig,
    SecretValue,
    check_config,
    diff_configs,
    effective_settings,
    find_config_path,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from supervisor.errors import ConfigError
from supervisor.model import OnUnhealthy, OverlapPolicy, RestartPolicy, TriggerMode

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLE = REPOSITORY / "config.example.toml"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the platform dirs into the test's folder, so that defaults are
    predictable and no test reads the real user config."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("RUNVISOR_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "runvisor.toml") -> Path:
    """Write dedented config text. Line 1 is the first line after the
    opening triple quote."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    # Private, as the README requires of a config with secrets in it.
    path.chmod(0o600)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.problems


def one_problem(tmp_path: Path, text: str, line: int, key: str) -> str:
    """Return the message of the only problem, after checking that it starts
    with `FILE:LINE: KEY: `."""
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    prefix = f"{tmp_path / 'runvisor.toml'}:{line}: {key}: "
    assert found[0].startswith(prefix), found[0]
    return found[0].removeprefix(prefix)


def project(tmp_path: Path, text: str, name: str = "p") -> ProjectConfig:
    return load(tmp_path, text).projects[name]


# The example file


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)

    assert list(config.projects) == ["hello", "tick", "web"]
    assert config.runvisor.data_dir == str(REPOSITORY / "data")
    hello, tick, web = config.projects.values()
    assert hello.trigger == TriggerMode.MANUAL
    assert hello.path == str(REPOSITORY / "examples" / "hello")
    assert tick.trigger == TriggerMode.SCHEDULE
    assert tick.cron == "* * * * *"
    assert tick.path == str(REPOSITORY / "examples" / "tick")
    assert web.trigger == TriggerMode.ALWAYS_RUNNING
    assert web.path == str(REPOSITORY / "examples" / "web")
    assert web.health is not None
    assert web.health.http == "http://127.0.0.1:8787/healthz"
    assert web.backoff == Backoff()


def test_example_socket_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")

    config = load_config(EXAMPLE)

    assert config.runvisor.socket == str(REPOSITORY / "data" / "control.sock")


def _example_keys() -> list[tuple[str, str, bool]]:
    """Return (table, key, commented) for every key of the example. The
    table is its header without project names, so `[projects.web.backoff]`
    is "projects.backoff", and a sub-table is a key of its project."""
    keys = []
    table = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]", line):
            parts = header[1].split(".")
            table = ".".join(parts[:1] + parts[2:])
            if len(parts) == 3:
                keys.append(("projects", parts[2], False))
        elif match := re.match(r"(# )?([a-z_]+) = ", line):
            keys.append((table, match[2], match[1] is not None))
    return keys


def test_example_lists_every_key() -> None:
    tables = {
        "runvisor": DaemonSettings,
        "credentials": CredentialSettings,
        "projects": ProjectConfig,
        "projects.backoff": Backoff,
        "projects.health": HealthConfig,
    }
    expected = {
        (table, field.name)
        for table, struct in tables.items()
        for field in msgspec.structs.fields(struct)
        if field.name != "name"
    }
    keys = _example_keys()

    assert {(table, key) for table, key, _ in keys} == expected


def test_example_comments_each_key_once() -> None:
    commented = [(table, key) for table, key, comment in _example_keys() if comment]

    repeated = sorted({key for key in commented if commented.count(key) > 1})
    assert repeated == []


# Commented keys whose example value is not the default, because the
# default is "unset" or depends on the machine.
_EXAMPLE_VALUES_NOT_DEFAULTS = {
    ("runvisor", "socket"),
    ("projects.hello", "timeout"),
    ("projects.tick", "timezone"),
    ("projects.web.health", "exec"),
    ("projects.web.health", "tcp"),
}


def _commented_defaults() -> list[tuple[str, str, str]]:
    """Return (table, key, value) for each commented `# key = value` line
    whose value is meant to be the default."""
    found = []
    table = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]", line):
            table = header[1]
        elif match := re.fullmatch(r"# ([a-z_]+) = (.+)", line):
            found.append((table, match[1], match[2]))
    return [item for item in found if item[:2] not in _EXAMPLE_VALUES_NOT_DEFAULTS]


_TRIGGER_OF_EXAMPLE = {
    "hello": 'trigger = "manual"\n',
    "tick": 'trigger = "schedule"\ncron = "* * * * *"\n',
    "web": 'trigger = "always_running"\n',
}


def _minimal_file(table: str, line: str = "") -> str:
    """Return a valid file with one project "p" of the same trigger as the
    example table's project, with `line` in the table's counterpart."""
    parts = table.split(".")
    if parts[0] != "projects":
        return f"[{table}]\n{line}\n[projects]\n"
    text = "[projects.p]\n" + _TRIGGER_OF_EXAMPLE[parts[1]]
    if len(parts) == 2:
        return text + line + "\n"
    if parts[2] == "health":
        text += '[projects.p.health]\nhttp = "http://127.0.0.1:8787/"\n'
    else:
        text += f"[projects.p.{parts[2]}]\n"
    return text + line + "\n"


def _read_setting(config: Config, table: str, key: str) -> object:
    parts = table.split(".")
    item: object = getattr(config, parts[0])
    if parts[0] == "projects":
        item = config.projects["p"]
        for sub_table in parts[2:]:
            item = getattr(item, sub_table)
    return getattr(item, key)


@pytest.mark.parametrize(("table", "key", "value"), _commented_defaults())
def test_example_comments_show_defaults(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    with_key = load(tmp_path, _minimal_file(table, f"{key} = {value}"))
    without_key = load(tmp_path, _minimal_file(table))

    assert _read_setting(with_key, table, key) == _read_setting(without_key, table, key)


# Durations and sizes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("2d", 172800.0),
        ("1m30s250ms", 90.25),
        ("-5s", -5.0),
        ("10", 10.0),
        (10, 10.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5x", "1h30", "h", "-", "--5s", "1.s", "ten seconds", "inf", True, [1]]
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"duration|finite"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (10, "10s"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (1.5, "1s500ms"),
        (0.0015, "1.5ms"),
        (86400, "24h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("100", 100),
        ("100B", 100),
        ("500KB", 500_000),
        ("10MiB", 10 * 1024 * 1024),
        ("2kib", 2048),
        ("1GiB", 1024**3),
        ("1.5MB", 1_500_000),
        ("2TB", 2 * 1000**4),
        ("1TiB", 1024**4),
        ("9" * 400 + "KB", int("9" * 400) * 1000),
    ],
)
def test_parse_size_accepts(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10XB", "MiB", "-5", "", 1.5, True])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)  # type: ignore[arg-type]


def test_durations_and_sizes_in_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [runvisor]
        log_max_bytes = "500KB"
        [projects.p]
        trigger = "always_running"
        start_seconds = "500ms"
        restart_window = "1h30m"
        stop_timeout = 3
        backoff = { initial = 0.5, max = "5m", reset_after = "10s" }
        """,
    )

    assert config.runvisor.log_max_bytes == 500_000
    web = config.projects["p"]
    assert web.start_seconds == 0.5
    assert web.restart_window == 5400.0
    assert web.stop_timeout == 3.0
    assert web.backoff == Backoff(initial=0.5, factor=2.0, max=300.0, reset_after=10.0)


def test_invalid_duration_names_key(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        stop_timeout = "ten"
        """,
        3,
        "projects.p.stop_timeout",
    )

    assert message.startswith('invalid duration "ten": write a number of seconds')


def test_invalid_size_names_key(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [runvisor]
        log_max_bytes = "10XB"
        [projects]
        """,
        2,
        "runvisor.log_max_bytes",
    )

    assert message.startswith('invalid size "10XB"')


# Defaults and paths


def test_defaults_of_minimal_project(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        """,
    )

    assert config.source == str(tmp_path / "runvisor.toml")
    assert config.runvisor.data_dir == str(tmp_path / "xdg-data" / "runvisor")
    assert config.runvisor.socket == str(tmp_path / "run" / "runvisor" / "control.sock")
    assert config.runvisor.log_max_bytes == 10 * 1024 * 1024
    assert config.runvisor.log_backups == 3
    assert config.runvisor.history_keep == 100
    assert config.runvisor.log_level == "info"
    assert config.credentials.backend == "auto"
    assert config.projects["p"] == ProjectConfig(
        name="p", path=str(tmp_path / "p"), trigger=TriggerMode.MANUAL
    )


def test_socket_without_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")

    config = load(tmp_path, '[runvisor]\ndata_dir = "state"\n')

    assert config.runvisor.data_dir == str(tmp_path / "state")
    assert config.runvisor.socket == str(tmp_path / "state" / "control.sock")


def test_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir("/")
    config = load(
        tmp_path,
        """
        [runvisor]
        data_dir = "~/runvisor-data"
        socket = "sockets/control.sock"
        [projects.relative]
        trigger = "manual"
        path = "../elsewhere/app"
        [projects.absolute]
        trigger = "manual"
        path = "/srv/app"
        [projects.by-name]
        trigger = "manual"
        """,
    )

    assert config.runvisor.data_dir == str(tmp_path / "home" / "runvisor-data")
    assert config.runvisor.socket == str(tmp_path / "sockets" / "control.sock")
    assert config.projects["relative"].path == str(
        tmp_path.parent / "elsewhere" / "app"
    )
    assert config.projects["absolute"].path == "/srv/app"
    assert config.projects["by-name"].path == str(tmp_path / "by-name")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, '[projects.p]\ntrigger = "manual"\n')

    with pytest.raises(AttributeError):
        config.projects["p"].command = "other"  # type: ignore[misc]


def test_parse_config_matches_load_config(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")

    assert parse_config(text, EXAMPLE) == load_config(EXAMPLE)


# find_config_path


def test_find_config_prefers_cli_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNVISOR_CONFIG", str(tmp_path / "from-env.toml"))
    monkeypatch.chdir(tmp_path)

    assert find_config_path("cli.toml") == tmp_path / "cli.toml"


def test_find_config_uses_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNVISOR_CONFIG", str(tmp_path / "from-env.toml"))
    (tmp_path / "runvisor.toml").touch()
    monkeypatch.chdir(tmp_path)

    assert find_config_path(None) == tmp_path / "from-env.toml"


def test_find_config_uses_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runvisor.toml").touch()
    monkeypatch.chdir(tmp_path)

    assert find_config_path(None) == tmp_path / "runvisor.toml"


def test_find_config_falls_back_to_user_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "SYSTEM_CONFIG_DIR", tmp_path / "etc-runvisor")

    expected = tmp_path / "xdg-config" / "runvisor" / "runvisor.toml"
    assert find_config_path(None) == expected


def test_find_config_uses_system_file_when_user_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    system_dir = tmp_path / "etc-runvisor"
    system_dir.mkdir()
    (system_dir / "runvisor.toml").touch()
    monkeypatch.setattr(paths, "SYSTEM_CONFIG_DIR", system_dir)

    assert find_config_path(None) == system_dir / "runvisor.toml"

    user_file = tmp_path / "xdg-config" / "runvisor" / "runvisor.toml"
    user_file.parent.mkdir(parents=True)
    user_file.touch()
    assert find_config_path(None) == user_file


# Broken files


def test_unclosed_string_keeps_line_and_column(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        command = "./run.sh
        """,
    )

    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'runvisor.toml'}:3: invalid TOML: ")
    assert "(at line 3, column 20)" in found[0]


def test_unknown_trigger_mode(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.a]
        trigger = "always_running"
        [projects.b]
        trigger = "sometimes"
        """,
        4,
        "projects.b.trigger",
    )

    assert message == (
        'invalid value "sometimes": expected one of "manual", "schedule", '
        '"always_running".'
    )


def test_duplicated_project_table(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [projects.a]
        trigger = "manual"

        [projects.a]
        trigger = "schedule"
        """,
    )

    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'runvisor.toml'}:4: invalid TOML: ")
    assert "Cannot declare ('projects', 'a') twice" in found[0]


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    found = problems(tmp_path, text)

    assert len(found) == 1
    assert found[0].startswith(
        f"{tmp_path / 'runvisor.toml'}:1: the config file is empty."
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.problems == [
        f"{path}: config file not found. Create it (config.example.toml lists "
        "every key), or pass --config PATH."
    ]


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "runvisor.toml"
    path.write_bytes(b'[projects.p]\ntrigger = "manual"\ndescription = "\xff"\n')

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.problems[0].startswith(f"{path}:3: invalid UTF-8 at byte 47.")


def test_zero_projects_is_valid_with_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "[projects]\n")

    config, errors, warnings = check_config(path)

    assert config is not None
    assert config.projects == {}
    assert errors == []
    assert warnings == [
        f"{path}:1: projects: no projects are configured, so the daemon has "
        "nothing to run. Add a [projects.NAME] table for each project."
    ]


def test_check_config_returns_errors(tmp_path: Path) -> None:
    path = write(tmp_path, '[projects.p]\ntrigger = "never"\n')

    config, errors, warnings = check_config(path)

    assert config is None
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:2: projects.p.trigger: invalid value")
    assert warnings == []


# Keys, types and enums


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = one_problem(tmp_path, '[project.p]\ntrigger = "manual"\n', 1, "project")

    assert message == (
        "unknown key 'project'. Did you mean 'projects'? "
        "Allowed keys: runvisor, credentials, projects."
    )


def test_unknown_project_key_lists_allowed(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        comand = "./start.sh"
        """,
        3,
        "projects.p.comand",
    )

    assert message.startswith("unknown key 'comand'. Did you mean 'command'? ")
    assert "Allowed keys: path, command, trigger, description, cron," in message


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('[runvisor]\nlevel = "info"\n[projects]\n', 2, "runvisor.level"),
        ('[credentials]\nstore = "file"\n[projects]\n', 2, "credentials.store"),
        (
            '[projects.p]\ntrigger = "always_running"\nbackoff = { jitter = 1 }\n',
            3,
            "projects.p.backoff.jitter",
        ),
        (
            '[projects.p]\ntrigger = "always_running"\n'
            '[projects.p.health]\nhttp = "http://127.0.0.1:80/"\nperiod = 5\n',
            5,
            "projects.p.health.period",
        ),
    ],
)
def test_unknown_keys_in_every_table(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    message = one_problem(tmp_path, text, line, key)

    assert message.startswith(f"unknown key '{key.rsplit('.', 1)[1]}'.")
    assert "Allowed keys: " in message


def test_project_name_key_is_rejected(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path, '[projects.p]\nname = "q"\ntrigger = "manual"\n', 2, "projects.p.name"
    )

    assert "comes from the table header" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("command = 5", "expected a string, got an integer (5)."),
        ('keep_env_file = "yes"', 'expected true or false, got a string ("yes").'),
        ("stop_timeout = true", "expected a duration, got a boolean (true)"),
        ("description = [1]", "expected a string, got an array."),
        ('env = "A=1"', "expected a table, got a string."),
        ("overlap = 1", "invalid value 1: expected one of"),
    ],
)
def test_wrong_types(tmp_path: Path, line: str, expected: str) -> None:
    key = line.split(" ")[0]
    message = one_problem(
        tmp_path, f'[projects.p]\ntrigger = "manual"\n{line}\n', 3, f"projects.p.{key}"
    )

    assert message.startswith(expected)


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        (
            'trigger = "always_running"\nrestart = "sometimes"',
            "restart",
            '"always", "on-failure", "never"',
        ),
        (
            'trigger = "manual"\noverlap = "merge"',
            "overlap",
            '"skip", "queue", "replace", "allow"',
        ),
        (
            'trigger = "always_running"\n'
            'health = { tcp = "127.0.0.1:1", on_unhealthy = "kill" }',
            "health.on_unhealthy",
            '"restart", "none"',
        ),
    ],
)
def test_bad_enums_list_allowed_values(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    message = one_problem(tmp_path, f"[projects.p]\n{text}\n", 3, f"projects.p.{key}")

    assert message.endswith(f"expected one of {allowed}.")


@pytest.mark.parametrize(
    ("table", "key", "value", "allowed"),
    [
        (
            "runvisor",
            "log_level",
            '"loud"',
            '"debug", "info", "warning", "error", "critical"',
        ),
        ("credentials", "backend", '"vault"', '"auto", "keyring", "file"'),
    ],
)
def test_bad_settings_enums(
    tmp_path: Path, table: str, key: str, value: str, allowed: str
) -> None:
    message = one_problem(
        tmp_path, f"[{table}]\n{key} = {value}\n[projects]\n", 2, f"{table}.{key}"
    )

    assert message == f"invalid value {value}: expected one of {allowed}."


def test_missing_trigger_names_table_line(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.ok]
        trigger = "manual"

        [projects.p]
        command = "./run.sh"
        """,
        4,
        "projects.p",
    )

    assert message == (
        "missing required key 'trigger': expected one of "
        '"manual", "schedule", "always_running".'
    )


def test_every_problem_is_reported_in_line_order(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [runvisor]
        history_keep = 0
        log_backups = -1

        [projects.a]
        trigger = "always_running"
        max_retries = -1
        restart_limit = 0
        backoff.factor = 0.5

        [projects."b c"]
        trigger = "manual"
        cron = "* * * * *"
        """,
    )

    path = tmp_path / "runvisor.toml"
    assert [problem.split(": ")[0:2] for problem in found] == [
        [f"{path}:2", "runvisor.history_keep"],
        [f"{path}:3", "runvisor.log_backups"],
        [f"{path}:7", "projects.a.max_retries"],
        [f"{path}:8", "projects.a.restart_limit"],
        [f"{path}:9", "projects.a.backoff.factor"],
        [f"{path}:11", 'projects."b c"'],
        [f"{path}:13", 'projects."b c".cron'],
    ]


def test_key_inside_inline_table_gets_its_line(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.p]
        trigger = "always_running"
        description = '''
        factor = 0.5 is not a key inside this string
        '''
        backoff = { initial = "1s", factor = 0.5 }
        """,
        6,
        "projects.p.backoff.factor",
    )

    assert message == "expected a number >= 1, got 0.5."


def test_key_of_project_with_dots_is_quoted(tmp_path: Path) -> None:
    one_problem(
        tmp_path,
        """
        [projects."web.prod"]
        trigger = "manual"
        command = ""
        """,
        3,
        'projects."web.prod".command',
    )


# Project names and paths


@pytest.mark.parametrize("name", ["a", "web-1.prod_x", "A" * 64, "9lives"])
def test_valid_project_names(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, f'[projects."{name}"]\ntrigger = "manual"\n')

    assert list(config.projects) == [name]


@pytest.mark.parametrize(
    "name", ["bad/name", "-lead", "_lead", "A" * 65, ".", "..", "with space", "ünï"]
)
def test_invalid_project_names(tmp_path: Path, name: str) -> None:
    key = config_values.format_key(("projects", name))
    message = one_problem(
        tmp_path, f'[projects."{name}"]\ntrigger = "manual"\n', 1, key
    )

    assert message.startswith(
        f"invalid project name {json.dumps(name, ensure_ascii=False)}: "
    )
    assert "folder name under logs/" in message


def test_project_names_differing_in_case(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.web]
        trigger = "manual"
        [projects.Web]
        trigger = "manual"
        """,
        3,
        "projects.Web",
    )

    assert message.startswith('the project name differs from "web" only in letter case')


def test_empty_path_is_rejected(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        '[projects.p]\ntrigger = "manual"\npath = "  "\n',
        3,
        "projects.p.path",
    )

    assert message == "must not be empty."


def test_nul_in_string_is_rejected(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        '[projects.p]\ntrigger = "manual"\ncommand = "./run.sh \\u0000"\n',
        3,
        "projects.p.command",
    )

    assert message == "must not contain a NUL character."


def test_unbalanced_command_quotes(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        command = "echo 'hello"
        """,
        3,
        "projects.p.command",
    )

    assert message.startswith('invalid command "echo \'hello": No closing quotation.')


# Trigger-specific keys


_MINIMAL_BY_MODE = {
    TriggerMode.MANUAL: 'trigger = "manual"',
    TriggerMode.SCHEDULE: 'trigger = "schedule"\ncron = "@hourly"',
    TriggerMode.ALWAYS_RUNNING: 'trigger = "always_running"',
}

_MODE_KEY_VALUES = {
    "cron": '"* * * * *"',
    "timezone": '"UTC"',
    "catch_up": "true",
    "jitter": '"5s"',
    "prestart": '"1s"',
    "overlap": '"queue"',
    "timeout": '"1m"',
    "restart": '"never"',
    "success_exit_codes": "[0, 2]",
    "start_seconds": "3",
    "backoff": "{ initial = 2 }",
    "max_retries": "1",
    "restart_limit": "2",
    "restart_window": '"2m"',
    "health": '{ tcp = "127.0.0.1:80" }',
}


def _misplaced_keys() -> list[tuple[str, TriggerMode, tuple[TriggerMode, ...]]]:
    cases = []
    for key, modes in config_checks.MODE_KEYS.items():
        for mode in TriggerMode:
            if mode not in modes:
                cases.append((key, mode, modes))
    return cases


@pytest.mark.parametrize(("key", "mode", "modes"), _misplaced_keys())
def test_key_for_other_mode_is_rejected(
    tmp_path: Path, key: str, mode: TriggerMode, modes: tuple[TriggerMode, ...]
) -> None:
    header = _MINIMAL_BY_MODE[mode]
    line = 2 + header.count("\n") + 1
    text = f"[projects.p]\n{header}\n{key} = {_MODE_KEY_VALUES[key]}\n"

    message = one_problem(tmp_path, text, line, f"projects.p.{key}")

    allowed = " or ".join(f'"{allowed_mode}"' for allowed_mode in modes)
    assert message == (
        f"'{key}' applies only to trigger = {allowed}, but this project has "
        f'trigger = "{mode}". Remove the key or change the trigger.'
    )


@pytest.mark.parametrize("key", list(_MODE_KEY_VALUES))
def test_key_for_own_mode_is_accepted(tmp_path: Path, key: str) -> None:
    mode = config_checks.MODE_KEYS[key][-1]
    header = _MINIMAL_BY_MODE[mode]
    if key == "cron":
        header = 'trigger = "schedule"'

    config = load(
        tmp_path, f"[projects.p]\n{header}\n{key} = {_MODE_KEY_VALUES[key]}\n"
    )

    assert config.projects["p"].trigger == mode


def test_schedule_settings_load(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.p]
        trigger = "schedule"
        cron = "30 2 * * *"
        timezone = "Europe/Paris"
        catch_up = true
        jitter = "30s"
        overlap = "replace"
        timeout = "1h"
        """,
    )

    assert loaded.cron == "30 2 * * *"
    assert loaded.timezone == "Europe/Paris"
    assert loaded.catch_up is True
    assert loaded.jitter == 30.0
    assert loaded.overlap == OverlapPolicy.REPLACE
    assert loaded.timeout == 3600.0


def test_always_running_settings_load(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.p]
        trigger = "always_running"
        restart = "on-failure"
        success_exit_codes = [2, 0, 2]
        start_seconds = 0
        max_retries = 0
        restart_limit = 3
        restart_window = "1m"
        [projects.p.health]
        exec = "./check.sh --quick"
        interval = "5s"
        timeout = "500ms"
        start_period = "10s"
        failure_threshold = 5
        success_threshold = 2
        on_unhealthy = "none"
        """,
    )

    assert loaded.restart == RestartPolicy.ON_FAILURE
    assert loaded.success_exit_codes == (0, 2)
    assert loaded.start_seconds == 0.0
    assert loaded.max_retries == 0
    assert loaded.restart_limit == 3
    assert loaded.restart_window == 60.0
    assert loaded.health == HealthConfig(
        exec="./check.sh --quick",
        interval=5.0,
        timeout=0.5,
        start_period=10.0,
        failure_threshold=5,
        success_threshold=2,
        on_unhealthy=OnUnhealthy.NONE,
    )


def test_schedule_requires_cron(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path, '[projects.p]\ntrigger = "schedule"\n', 1, "projects.p"
    )

    assert message.startswith("missing required key 'cron'")


# Cron expressions and time zones

# Each invalid expression with a word its reason must contain.
_BAD_CRON = {
    "0 0 31 2 *": "no possible date",
    "0 0 30 2 *": "no possible date",
    "*/5 * * * * *": "fields",
    "61 * * * *": "out of range",
    "0 0 * * MON-": "bad range",
    "@reboot": "@reboot",
}


def _cron_file(expression: str) -> str:
    return f"""
    [projects.P1]
    trigger = "always_running"

    [projects.P2]
    trigger = "schedule"
    cron = "{expression}"
    """


@pytest.mark.parametrize(("expression", "reason"), _BAD_CRON.items())
def test_invalid_cron_is_rejected(tmp_path: Path, expression: str, reason: str) -> None:
    message = one_problem(tmp_path, _cron_file(expression), 6, "projects.P2.cron")

    prefix = f"invalid cron expression '{expression}': "
    assert message.startswith(prefix)
    assert reason in message.removeprefix(prefix)


def test_invalid_cron_validation_is_fast(tmp_path: Path) -> None:
    text = '[projects.P1]\ntrigger = "always_running"\n'
    for number, expression in enumerate(_BAD_CRON, start=2):
        text += f'[projects.P{number}]\ntrigger = "schedule"\ncron = "{expression}"\n'
    path = write(tmp_path, text)

    started = time.monotonic()
    config, errors, _ = check_config(path)
    elapsed = time.monotonic() - started

    assert config is None
    assert len(errors) == len(_BAD_CRON)
    assert elapsed < 2.0


@pytest.mark.parametrize(
    "expression", ["*/5 * * * *", "@hourly", "0 8 * * 1", "30 4 1,15 * 5"]
)
def test_valid_cron_is_accepted(tmp_path: Path, expression: str) -> None:
    config = load(tmp_path, _cron_file(expression))

    assert config.projects["P2"].cron == expression


def test_cron_with_timezone_loads(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.P2]
        trigger = "schedule"
        cron = "30 2 * * *"
        timezone = "America/New_York"
        """,
        "P2",
    )

    assert loaded.timezone == "America/New_York"


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        (
            "Mars/Olympus_Mons",
            'unknown time zone "Mars/Olympus_Mons". Expected an IANA',
        ),
        (
            "europe/paris",
            'unknown time zone "europe/paris". Did you mean "Europe/Paris"?',
        ),
        ("../etc/passwd", 'unknown time zone "../etc/passwd"'),
        ("Europe/", 'unknown time zone "Europe/"'),
        ("Europe", 'unknown time zone "Europe"'),
        ("", "must not be empty."),
    ],
)
def test_unknown_timezone_is_rejected(tmp_path: Path, zone: str, expected: str) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "schedule"\ncron = "@daily"\ntimezone = "{zone}"\n',
        4,
        "projects.p.timezone",
    )

    assert message.startswith(expected)


# Environment mappings and secrets


def test_env_mappings_load(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        [projects.p.env]
        NOTION_KEY = { credential = "my-notion" }
        API_SECRET = { value = "s3cr3t" }
        LOG_LEVEL = "debug"
        _PRIVATE = ""
        """,
    )

    assert loaded.env == {
        "NOTION_KEY": CredentialRef("my-notion"),
        "API_SECRET": SecretValue("s3cr3t"),
        "LOG_LEVEL": "debug",
        "_PRIVATE": "",
    }


@pytest.mark.parametrize("name", ["MY-VAR", "1ABC", "A B", "É"])
def test_invalid_env_names(tmp_path: Path, name: str) -> None:
    key = config_values.format_key(("projects", "p", "env", name))
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "manual"\n[projects.p.env]\n"{name}" = "x"\n',
        4,
        key,
    )

    assert message.startswith(
        f"invalid variable name {json.dumps(name, ensure_ascii=False)}: "
    )


def test_reserved_env_prefix(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        '[projects.p]\ntrigger = "manual"\nenv = { RUNVISOR_PROJECT = "x" }\n',
        3,
        "projects.p.env.RUNVISOR_PROJECT",
    )

    assert message.startswith("variable names starting with RUNVISOR_ are reserved")


@pytest.mark.parametrize(
    ("entry", "key", "expected"),
    [
        ('A = "one\\u0000two"', "A", "the value contains a NUL character"),
        (
            'A = { value = "hunter2\\u0000" }',
            "A.value",
            "the secret contains a NUL character",
        ),
        (
            'A = { credential = "bad nick" }',
            "A.credential",
            'invalid credential nickname "bad nick"',
        ),
        ('A = { credential = "" }', "A.credential", "must not be empty."),
        ("A = { value = 12345 }", "A.value", "expected a string, got an integer."),
        ('A = { secret = "hunter2" }', "A.secret", "unknown key 'secret'"),
        (
            'A = { value = "hunter2", credential = "x" }',
            "A",
            'expected a string, { credential = "NICKNAME" } or { value = "SECRET" }, '
            "got a table with several keys.",
        ),
        ("A = 8080", "A", "expected a string, { credential"),
    ],
)
def test_invalid_env_values(
    tmp_path: Path, entry: str, key: str, expected: str
) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "manual"\n[projects.p.env]\n{entry}\n',
        4,
        f"projects.p.env.{key}",
    )

    assert message.startswith(expected)


def test_messages_never_contain_secret_literals(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        [projects.p.env]
        "BAD-NAME" = { value = "hunter2-secret" }
        OTHER = { value = "hunter2-secret", valeu = "hunter2-secret" }
        TYPO = { valeu = "hunter2-secret" }
        NUL = { value = "hunter2-secret\\u0000" }
        """,
    )

    assert len(found) == 4
    for message in found:
        assert "hunter2" not in message


def test_secret_value_repr_is_masked(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[projects.p]\ntrigger = "manual"\nenv = { A = { value = "hunter2" } }\n',
    )

    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.projects["p"].env)


# Numbers and limits


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        (
            "backoff.initial = 0",
            "backoff.initial",
            "expected a duration greater than 0 and at most 30d, got 0.",
        ),
        ("backoff.factor = 0.5", "backoff.factor", "expected a number >= 1, got 0.5."),
        (
            'backoff.factor = "2"',
            "backoff.factor",
            'expected a number, got a string ("2").',
        ),
        (
            'backoff.reset_after = "-1"',
            "backoff.reset_after",
            'expected a duration from 0 to 365d, got "-1".',
        ),
        (
            "max_retries = -1",
            "max_retries",
            "expected an integer from 0 to 1000000, got -1.",
        ),
        (
            "restart_limit = 0",
            "restart_limit",
            "expected an integer from 1 to 1000000, got 0.",
        ),
        (
            'restart_window = "0s"',
            "restart_window",
            'expected a duration greater than 0 and at most 365d, got "0s".',
        ),
        (
            "start_seconds = -1",
            "start_seconds",
            "expected a duration from 0 to 30d, got -1.",
        ),
        (
            "stop_timeout = -0.5",
            "stop_timeout",
            "expected a duration from 0 to 30d, got -0.5.",
        ),
        (
            "success_exit_codes = [256]",
            "success_exit_codes",
            "invalid exit code 256: expected integers from 0 to 255.",
        ),
        ("success_exit_codes = [-1]", "success_exit_codes", "invalid exit code -1"),
        (
            "success_exit_codes = []",
            "success_exit_codes",
            "must list at least one exit code",
        ),
        (
            "success_exit_codes = 0",
            "success_exit_codes",
            "expected an array of exit codes",
        ),
        ('success_exit_codes = ["0"]', "success_exit_codes", 'invalid exit code "0"'),
        ("max_retries = 1.5", "max_retries", "expected an integer, got a float (1.5)."),
    ],
)
def test_number_limits(tmp_path: Path, line: str, key: str, expected: str) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "always_running"\n{line}\n',
        3,
        f"projects.p.{key}",
    )

    assert message.startswith(expected)


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        """
        [projects.p]
        trigger = "always_running"
        [projects.p.backoff]
        initial = "2m"
        max = "30s"
        """,
        5,
        "projects.p.backoff.max",
    )

    assert message == "expected a duration >= initial (120s), got 30s."


def test_backoff_max_below_default_initial(tmp_path: Path) -> None:
    message = one_problem(
        tmp_path,
        '[projects.p]\ntrigger = "always_running"\nbackoff = { max = "500ms" }\n',
        3,
        "projects.p.backoff.max",
    )

    assert message == "expected a duration >= initial (1s), got 0.5s."


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        (
            "log_backups = -1",
            "log_backups",
            "expected an integer from 0 to 1000000, got -1.",
        ),
        (
            "history_keep = 0",
            "history_keep",
            "expected an integer from 1 to 1000000, got 0.",
        ),
        (
            "log_max_bytes = 0",
            "log_max_bytes",
            "expected a size from 1 byte to 1TiB, got 0.",
        ),
        ("log_max_bytes = 1.5", "log_max_bytes", "expected a size, got a float (1.5)"),
        ('data_dir = ""', "data_dir", "must not be empty."),
    ],
)
def test_daemon_limits(tmp_path: Path, line: str, key: str, expected: str) -> None:
    message = one_problem(
        tmp_path, f"[runvisor]\n{line}\n[projects]\n", 2, f"runvisor.{key}"
    )

    assert message.startswith(expected)


# Each number key with a value past its upper limit, the message for it, and
# the value at the limit, which loads.
_UPPER_LIMITS = [
    (
        "projects.hello",
        "stop_timeout = 1e300",
        "expected a duration from 0 to 30d, got 1e+300.",
        'stop_timeout = "30d"',
    ),
    (
        "projects.hello",
        'timeout = "366d"',
        'expected a duration greater than 0 and at most 365d, got "366d".',
        'timeout = "365d"',
    ),
    (
        "projects.tick",
        'jitter = "99999999999h"',
        'expected a duration from 0 to 1d, got "99999999999h".',
        'jitter = "24h"',
    ),
    (
        "projects.web",
        "start_seconds = 2592001",
        "expected a duration from 0 to 30d, got 2592001.",
        "start_seconds = 2592000",
    ),
    (
        "projects.web",
        "max_retries = 99999999999999999999",
        "expected an integer from 0 to 1000000, got 99999999999999999999.",
        "max_retries = 1000000",
    ),
    (
        "projects.web",
        "restart_limit = 1000001",
        "expected an integer from 1 to 1000000, got 1000001.",
        "restart_limit = 1000000",
    ),
    (
        "projects.web",
        'restart_window = "365d1s"',
        'expected a duration greater than 0 and at most 365d, got "365d1s".',
        'restart_window = "365d"',
    ),
    (
        "projects.web.backoff",
        "initial = 1e300",
        "expected a duration greater than 0 and at most 30d, got 1e+300.",
        'initial = "30d"\nmax = "30d"',
    ),
    (
        "projects.web.backoff",
        'max = "31d"',
        'expected a duration greater than 0 and at most 30d, got "31d".',
        'max = "30d"',
    ),
    (
        "projects.web.backoff",
        'reset_after = "366d"',
        'expected a duration from 0 to 365d, got "366d".',
        'reset_after = "365d"',
    ),
    (
        "projects.web.health",
        'interval = "31d"',
        'expected a duration greater than 0 and at most 30d, got "31d".',
        'interval = "30d"',
    ),
    (
        "projects.web.health",
        'timeout = "31d"',
        'expected a duration greater than 0 and at most 30d, got "31d".',
        'timeout = "30d"',
    ),
    (
        "projects.web.health",
        'start_period = "31d"',
        'expected a duration from 0 to 30d, got "31d".',
        'start_period = "30d"',
    ),
    (
        "projects.web.health",
        "failure_threshold = 1000001",
        "expected an integer from 1 to 1000000, got 1000001.",
        "failure_threshold = 1000000",
    ),
    (
        "projects.web.health",
        "success_threshold = 1000001",
        "expected an integer from 1 to 1000000, got 1000001.",
        "success_threshold = 1000000",
    ),
    (
        "runvisor",
        'log_max_bytes = "1025GiB"',
        'expected a size from 1 byte to 1TiB, got "1025GiB".',
        'log_max_bytes = "1TiB"',
    ),
    (
        "runvisor",
        'log_max_bytes = "' + "9" * 400 + 'TB"',
        'expected a size from 1 byte to 1TiB, got "99999',
        "log_max_bytes = 1099511627776",
    ),
    (
        "runvisor",
        "log_backups = 1000001",
        "expected an integer from 0 to 1000000, got 1000001.",
        "log_backups = 1000000",
    ),
    (
        "runvisor",
        "history_keep = 1000001",
        "expected an integer from 1 to 1000000, got 1000001.",
        "history_keep = 1000000",
    ),
]


@pytest.mark.parametrize(("table", "past", "expected", "limit"), _UPPER_LIMITS)
def test_numbers_past_upper_limit(
    tmp_path: Path, table: str, past: str, expected: str, limit: str
) -> None:
    text = _minimal_file(table, past)
    line = text.splitlines().index(past) + 1
    # The example's table "projects.web.backoff" is "projects.p.backoff" here.
    key = ".".join([*table.split(".")[:1], "p", *table.split(".")[2:]])
    if table == "runvisor":
        key = table
    key += "." + past.partition(" = ")[0]

    message = one_problem(tmp_path, text, line, key)

    assert message.startswith(expected)


@pytest.mark.parametrize(("table", "past", "expected", "limit"), _UPPER_LIMITS)
def test_numbers_at_upper_limit_load(
    tmp_path: Path, table: str, past: str, expected: str, limit: str
) -> None:
    _, errors, _ = check_config(write(tmp_path, _minimal_file(table, limit)))

    assert errors == []


def test_zero_backups_are_allowed(tmp_path: Path) -> None:
    config = load(tmp_path, "[runvisor]\nlog_backups = 0\n[projects]\n")

    assert config.runvisor.log_backups == 0


# Stop signal


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("TERM", "SIGTERM"),
        ("SIGTERM", "SIGTERM"),
        ("term", "SIGTERM"),
        ("sigint", "SIGINT"),
        ("HUP", "SIGHUP"),
    ],
)
def test_stop_signal_is_normalised(tmp_path: Path, written: str, stored: str) -> None:
    loaded = project(
        tmp_path, f'[projects.p]\ntrigger = "manual"\nstop_signal = "{written}"\n'
    )

    assert loaded.stop_signal == stored


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("SIGKILL", "SIGKILL cannot be caught"),
        ("kill", "SIGKILL cannot be caught"),
        ("STOP", "SIGSTOP cannot be caught"),
        ("SIGFOO", 'unknown signal "SIGFOO"'),
        ("", "must not be empty."),
    ],
)
def test_stop_signal_rejects(tmp_path: Path, written: str, expected: str) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "manual"\nstop_signal = "{written}"\n',
        3,
        "projects.p.stop_signal",
    )

    assert message.startswith(expected)


# Health probes


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        (
            'http = "http://127.0.0.1:8787/healthz"',
            HealthConfig(http="http://127.0.0.1:8787/healthz"),
        ),
        ('http = "http://localhost/"', HealthConfig(http="http://localhost/")),
        ('tcp = "127.0.0.1:5432"', HealthConfig(tcp="127.0.0.1:5432")),
        ('tcp = "[::1]:80"', HealthConfig(tcp="[::1]:80")),
        ('exec = "pg_isready -q"', HealthConfig(exec="pg_isready -q")),
    ],
)
def test_health_probes_load(tmp_path: Path, probe: str, expected: HealthConfig) -> None:
    loaded = project(
        tmp_path,
        f'[projects.p]\ntrigger = "always_running"\n[projects.p.health]\n{probe}\n',
    )

    assert loaded.health == expected


@pytest.mark.parametrize(
    ("probe", "key", "expected"),
    [
        (
            'http = "https://example.org/"',
            "http",
            'invalid URL "https://example.org/": https is not supported',
        ),
        (
            'http = "ftp://127.0.0.1/"',
            "http",
            'invalid URL "ftp://127.0.0.1/": expected an http:// URL',
        ),
        (
            'http = "http:///healthz"',
            "http",
            'invalid URL "http:///healthz": the URL has no host.',
        ),
        (
            'http = "http://127.0.0.1:99999/"',
            "http",
            'invalid URL "http://127.0.0.1:99999/": the port must be an integer',
        ),
        (
            'http = "127.0.0.1:8080"',
            "http",
            'invalid URL "127.0.0.1:8080": expected an http:// URL',
        ),
        (
            'http = "http://127.0.0.1:0/"',
            "http",
            'invalid URL "http://127.0.0.1:0/": the port must be an integer',
        ),
        (
            'http = "http://admin:hunter2@127.0.0.1:8080/"',
            "http",
            'invalid URL "http://***@127.0.0.1:8080/": user names and passwords',
        ),
        (
            'http = "http://127.0.0.1/café"',
            "http",
            'invalid URL "http://127.0.0.1/café": the URL contains non-ASCII',
        ),
        (
            'tcp = "localhost"',
            "tcp",
            'invalid address "localhost": expected "host:port"',
        ),
        ('tcp = "localhost:0"', "tcp", 'invalid address "localhost:0"'),
        ('tcp = "localhost:65536"', "tcp", 'invalid address "localhost:65536"'),
        ('tcp = ":80"', "tcp", 'invalid address ":80"'),
        ('tcp = "localhost:8²"', "tcp", 'invalid address "localhost:8²"'),
        ('exec = ""', "exec", "must not be empty."),
    ],
)
def test_invalid_health_targets(
    tmp_path: Path, probe: str, key: str, expected: str
) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "always_running"\n[projects.p.health]\n{probe}\n',
        4,
        f"projects.p.health.{key}",
    )

    assert message.startswith(expected)


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        (
            'timeout = "0s"',
            "timeout",
            'expected a duration greater than 0 and at most 30d, got "0s".',
        ),
        (
            "interval = 0",
            "interval",
            "expected a duration greater than 0 and at most 30d, got 0.",
        ),
        (
            "failure_threshold = 0",
            "failure_threshold",
            "expected an integer from 1 to 1000000, got 0.",
        ),
        (
            "success_threshold = 0",
            "success_threshold",
            "expected an integer from 1 to 1000000, got 0.",
        ),
        (
            "start_period = -1",
            "start_period",
            "expected a duration from 0 to 30d, got -1.",
        ),
    ],
)
def test_health_limits(tmp_path: Path, line: str, key: str, expected: str) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "always_running"\n[projects.p.health]\n'
        f'tcp = "127.0.0.1:80"\n{line}\n',
        5,
        f"projects.p.health.{key}",
    )

    assert message == expected


@pytest.mark.parametrize(
    ("probes", "found"),
    [
        ("interval = 5", "none"),
        ('http = "http://127.0.0.1/"\ntcp = "127.0.0.1:80"', "'http' and 'tcp'"),
    ],
)
def test_health_needs_exactly_one_probe(
    tmp_path: Path, probes: str, found: str
) -> None:
    message = one_problem(
        tmp_path,
        f'[projects.p]\ntrigger = "always_running"\n[projects.p.health]\n{probes}\n',
        3,
        "projects.p.health",
    )

    assert (
        message
        == f"expected exactly one probe, 'exec', 'http' or 'tcp', found {found}."
    )


# Warnings from check_config


def _runnable_project(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    script = folder / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return folder


def test_valid_project_has_no_warnings(tmp_path: Path) -> None:
    _runnable_project(tmp_path)
    path = write(tmp_path, '[projects.app]\ntrigger = "manual"\n')

    config, errors, warnings = check_config(path)

    assert config is not None
    assert errors == []
    assert warnings == []


def test_short_secret_warns_without_value(tmp_path: Path) -> None:
    _runnable_project(tmp_path)
    path = write(
        tmp_path,
        """
        [projects.app]
        trigger = "manual"
        env = { PIN = { value = "x9z" }, LONG = { value = "long enough" } }
        """,
    )

    _, errors, warnings = check_config(path)

    assert errors == []
    assert warnings == [
        f"{path}:3: projects.app.env.PIN: the secret literal is shorter than 4 "
        "characters, so it is not masked in output. Use a longer secret."
    ]
    assert "x9z" not in warnings[0]


@pytest.mark.parametrize("mapped", [True, False])
def test_shared_folder_warns_when_variables_are_mapped(
    tmp_path: Path, mapped: bool
) -> None:
    folder = _runnable_project(tmp_path)
    env = 'env = { TOKEN = { value = "long enough" } }' if mapped else ""
    path = write(
        tmp_path,
        f"""
        [projects.app]
        trigger = "manual"
        {env}

        [projects.second]
        trigger = "manual"
        path = "{folder}/"
        """,
    )

    _, errors, warnings = check_config(path)

    assert errors == []
    if not mapped:
        assert warnings == []
        return
    assert len(warnings) == 2
    assert warnings[1].startswith(f"{path}:7: projects.second.path: projects ")
    assert f"'app', 'second' share the folder {folder}" in warnings[0]
    assert "Give each project its own folder." in warnings[1]
    assert "long enough" not in "".join(warnings)


def test_readable_config_with_secret_literals_warns(tmp_path: Path) -> None:
    _runnable_project(tmp_path)
    path = write(
        tmp_path,
        """
        [projects.app]
        trigger = "manual"
        env = { TOKEN = { value = "long enough" } }
        """,
    )
    _, _, private = check_config(path)
    path.chmod(0o644)

    _, errors, warnings = check_config(path)

    assert private == []
    assert errors == []
    assert warnings == [
        f"{path}:3: projects.app.env.TOKEN: the config file contains secret literals "
        f"but has mode 0644, so other users may read them. Run 'chmod 600 {path}'."
    ]


def test_missing_folder_warns(tmp_path: Path) -> None:
    path = write(tmp_path, '[projects.app]\ntrigger = "manual"\npath = "later"\n')

    config, errors, warnings = check_config(path)

    assert config is not None
    assert errors == []
    assert warnings == [
        f"{path}:3: projects.app.path: the project folder {tmp_path / 'later'} "
        "does not exist, so runs will fail until it is created."
    ]


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("./missing.sh --flag", "{folder}/missing.sh does not exist"),
        (
            "./data.txt",
            "{folder}/data.txt is not executable (run 'chmod +x ./data.txt')",
        ),
        (
            "runvisor-no-such-program arg",
            "'runvisor-no-such-program' is not found on PATH",
        ),
    ],
)
def test_missing_command_warns(tmp_path: Path, command: str, problem: str) -> None:
    folder = _runnable_project(tmp_path)
    (folder / "data.txt").write_text("not a program\n")
    path = write(
        tmp_path, f'[projects.app]\ntrigger = "manual"\ncommand = "{command}"\n'
    )

    _, errors, warnings = check_config(path)

    assert errors == []
    assert warnings == [
        f"{path}:3: projects.app.command: {problem.format(folder=folder)}, so runs "
        "will fail until it is fixed."
    ]


def test_program_on_path_does_not_warn(tmp_path: Path) -> None:
    _runnable_project(tmp_path)
    path = write(
        tmp_path, '[projects.app]\ntrigger = "manual"\ncommand = "sh -c true"\n'
    )

    _, _, warnings = check_config(path)

    assert warnings == []


def test_long_socket_path_warns(tmp_path: Path) -> None:
    _runnable_project(tmp_path)
    socket = "s" * 120 + ".sock"
    path = write(
        tmp_path,
        f'[runvisor]\nsocket = "{socket}"\n[projects.app]\ntrigger = "manual"\n',
    )

    _, _, warnings = check_config(path)

    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path}:2: runvisor.socket: the socket path ")
    assert "so the daemon cannot listen on it" in warnings[0]


# Diffs between configs

_DIFF_BASE = """
[runvisor]
data_dir = "data"

[projects.a]
trigger = "always_running"
health = { tcp = "127.0.0.1:9" }

[projects.b]
trigger = "schedule"
cron = "*/5 * * * *"

[projects.c]
trigger = "manual"

[projects.c.env]
GREETING = "hello"
TOKEN = { value = "first-secret" }
KEY = { credential = "k" }
"""


def _diff(tmp_path: Path, old_text: str, new_text: str) -> tuple[Config, Config]:
    old = load_config(write(tmp_path, old_text, "old.toml"))
    new = load_config(write(tmp_path, new_text, "new.toml"))
    return old, new


def test_diff_of_identical_file(tmp_path: Path) -> None:
    path = write(tmp_path, _DIFF_BASE)
    old = load_config(path)
    os.utime(path, (time.time() + 60, time.time() + 60))
    new = load_config(path)

    diff = diff_configs(old, new)

    assert diff.added == ()
    assert diff.removed == ()
    assert diff.changed == ()
    assert diff.unchanged == ("a", "b", "c")
    assert diff.settings_changed is False


def test_diff_ignores_order(tmp_path: Path) -> None:
    settings, a, b, c, c_env = _DIFF_BASE.split("\n\n")
    env_header, *env_lines = c_env.strip().splitlines()
    c_env = "\n".join([env_header, *reversed(env_lines)])
    reordered = "\n\n".join([c_env, settings, c, a, b]) + "\n"
    old, new = _diff(tmp_path, _DIFF_BASE, reordered)

    diff = diff_configs(old, new)

    assert list(new.projects) == ["c", "a", "b"]
    assert diff.changed == ()
    assert sorted(diff.unchanged) == ["a", "b", "c"]
    assert diff.settings_changed is False


def test_diff_of_changed_env_literal(tmp_path: Path) -> None:
    changed = _DIFF_BASE.replace("first-secret", "second-secret")
    old, new = _diff(tmp_path, _DIFF_BASE, changed)

    diff = diff_configs(old, new)

    assert diff.changed == ("c",)
    assert diff.unchanged == ("a", "b")
    assert diff.added == ()
    assert diff.removed == ()


def test_diff_of_added_and_removed_projects(tmp_path: Path) -> None:
    added = _DIFF_BASE + '\n[projects.d]\ntrigger = "manual"\n'
    old, new = _diff(tmp_path, _DIFF_BASE, added)

    grown = diff_configs(old, new)
    shrunk = diff_configs(new, old)

    assert grown.added == ("d",)
    assert grown.removed == ()
    assert grown.unchanged == ("a", "b", "c")
    assert shrunk.removed == ("d",)
    assert shrunk.added == ()
    assert shrunk.unchanged == ("a", "b", "c")


def test_diff_of_settings(tmp_path: Path) -> None:
    changed = _DIFF_BASE.replace(
        'data_dir = "data"', 'data_dir = "data"\nlog_backups = 5'
    )
    old, new = _diff(tmp_path, _DIFF_BASE, changed)

    diff = diff_configs(old, new)

    assert diff.settings_changed is True
    assert diff.changed == ()
    assert diff.unchanged == ("a", "b", "c")


def test_diff_of_credentials_backend(tmp_path: Path) -> None:
    changed = _DIFF_BASE + '\n[credentials]\nbackend = "file"\n'
    old, new = _diff(tmp_path, _DIFF_BASE, changed)

    assert diff_configs(old, new).settings_changed is True


def test_diff_ignores_exit_code_order(tmp_path: Path) -> None:
    first = '[projects.a]\ntrigger = "always_running"\nsuccess_exit_codes = [0, 2]\n'
    second = first.replace("[0, 2]", "[2, 0]")
    old, new = _diff(tmp_path, first, second)

    assert diff_configs(old, new).unchanged == ("a",)


# Effective settings


def test_effective_settings_of_manual_project(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.p]
        trigger = "manual"
        stop_timeout = 90
        env = { A = "plain", B = { value = "hunter2" }, C = { credential = "nick" } }
        """,
    )

    settings = effective_settings(loaded)

    assert settings == {
        "name": "p",
        "path": str(tmp_path / "p"),
        "command": "./run.sh",
        "trigger": "manual",
        "description": "",
        "overlap": "skip",
        "timeout": None,
        "stop_signal": "SIGTERM",
        "stop_timeout": "1m30s",
        "env": {"A": "plain", "B": "***", "C": {"credential": "nick"}},
        "keep_env_file": False,
    }
    assert "hunter2" not in json.dumps(settings)


def test_effective_settings_of_always_running_project(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        """
        [projects.p]
        trigger = "always_running"
        health = { http = "http://127.0.0.1:8787/healthz" }
        """,
    )

    settings = effective_settings(loaded)

    assert "cron" not in settings
    assert "overlap" not in settings
    assert settings["restart"] == "always"
    assert settings["success_exit_codes"] == [0]
    assert settings["backoff"] == {
        "initial": "1s",
        "factor": 2.0,
        "max": "1m",
        "reset_after": "1m",
    }
    assert settings["health"] == {
        "http": "http://127.0.0.1:8787/healthz",
        "interval": "10s",
        "timeout": "1s",
        "start_period": "0s",
        "failure_threshold": 3,
        "success_threshold": 1,
        "on_unhealthy": "restart",
    }
    health = settings["health"]
    assert isinstance(health, dict)
    assert type(health["on_unhealthy"]) is str
    assert settings["restart_window"] == "1m"


def test_effective_settings_of_schedule_project(tmp_path: Path) -> None:
    loaded = project(
        tmp_path,
        '[projects.p]\ntrigger = "schedule"\ncron = "@hourly"\njitter = "1.5s"\n',
    )

    settings = effective_settings(loaded)

    assert settings["cron"] == "@hourly"
    assert settings["timezone"] is None
    assert settings["jitter"] == "1s500ms"
    assert "restart" not in settings


# Schema and checks agree


@pytest.mark.parametrize(
    ("struct", "checkers"),
    [
        (DaemonSettings, config_checks._DAEMON_CHECKERS),
        (Backoff, config_checks._BACKOFF_CHECKERS),
        (HealthConfig, config_checks._HEALTH_CHECKERS),
        (ProjectConfig, config_checks._PROJECT_CHECKERS),
    ],
)
def test_every_field_has_a_check(struct: type, checkers: dict[str, object]) -> None:
    fields = [
        field.name for field in msgspec.structs.fields(struct) if field.name != "name"
    ]

    assert list(checkers) == fields


def test_example_is_valid_toml_for_every_commented_key() -> None:
    # Uncommenting every "# key = value" line of a table must still parse,
    # so that a reader can copy any of them as written.
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if match := re.fullmatch(r"# ([A-Za-z_]+ = .+?)(\s+#.*)?", line):
            tomllib.loads(match[1])
