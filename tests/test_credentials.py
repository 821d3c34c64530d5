"""Resolution of env mappings, `.env.local` writing and bounded lookups.

`.env.local` is checked the way `run.sh` uses it: a real bash sources it
under `set -euo pipefail` and hands each variable to a child process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.config import ProjectConfig, check_config, parse_config
from supervisor.credential_backends import MAX_HUNG_CALLS, BackendInfo, TimedCalls
from supervisor.credential_file import FileSecrets, KeySource
from supervisor.credentials import BackendCredentials, credential_warnings, resolve_env
from supervisor.env_file import ENV_FILE_NAME, format_env_file, write_env_file
from supervisor.errors import ConfigError, CredentialError

# Values that break naive quoting: each must come back byte for byte.
HOSTILE_VALUES = {
    "SINGLE_QUOTE": "it's",
    "ONLY_QUOTE": "'",
    "QUOTE_RUN": "'''\"\"\"''",
    "DOUBLE_QUOTE": 'say "hi"',
    "DOLLAR": "$HOME $1 ${UNSET_VARIABLE} $$ $(touch pwned-subshell)",
    "BACKTICK": "`touch pwned-backtick`",
    "BACKSLASH": "C:\\new\\table\\u0142 \\\\ \\' \\",
    "HASH": "# not a comment",
    "INNER_HASH": "a #b",
    "NEWLINES": "line 1\nline 2\n\n",
    "CRLF": "a\r\nb\r",
    "SPACES": "  leading and trailing  ",
    "EMPTY": "",
    "GLOB": "*?[x] ~root",
    "OPERATORS": ";|&<>(){}",
    "HISTORY": "!! !$ !-1",
    "PERCENT": "%s %(x)s %%",
    "EQUALS": "a=b=c",
    "UNICODE": "héllo ✓ 🔑 \u0142",
    "TAB": "a\tb",
    "CONTROL": "\x01\x07\x1b[31m\x7f",
    "INJECTION": "x'\nexport PWNED=1\necho pwned > pwned-file\n'",
}

# Prints each named variable of the child's environment as hex, after bash
# has sourced .env.local.
DUMP_ENVIRONMENT = (
    "import json, os, sys; "
    "print(json.dumps({n: os.environb.get(n.encode(), b'-unset-').hex() "
    "for n in sys.argv[1:]}))"
)


def source_env_file(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Source `.env.local` in a real bash and return the named variables
    from the environment of a child process of that bash."""
    script = (
        "set -euo pipefail\n"
        "source ./.env.local\n"
        f'exec "{sys.executable}" -c "$DUMP" "$@"\n'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", *names, "PWNED"],
        cwd=folder,
        env={"PATH": os.environ["PATH"], "DUMP": DUMP_ENVIRONMENT},
        capture_output=True,
        check=True,
        timeout=30,
    )
    dumped = json.loads(result.stdout)
    return {name: bytes.fromhex(value) for name, value in dumped.items()}


def printf_values(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Source `.env.local` and print each variable with printf '%s'."""
    script = "set -euo pipefail\nsource ./.env.local\n" + "".join(
        f"printf '%s' \"${name}\" > out.{name}\n" for name in names
    )
    subprocess.run(
        ["bash", "-c", script],
        cwd=folder,
        env={"PATH": os.environ["PATH"]},
        check=True,
        timeout=30,
    )
    return {name: (folder / f"out.{name}").read_bytes() for name in names}


def project(tmp_path: Path, env_lines: str) -> ProjectConfig:
    text = textwrap.dedent(
        f"""
        [runvisor]
        data_dir = "{tmp_path / "data"}"
        socket = "{tmp_path / "control.sock"}"

        [projects.p]
        path = "{tmp_path}"
        trigger = "manual"

        [projects.p.env]
        """
    ) + textwrap.dedent(env_lines)
    return parse_config(text, tmp_path / "runvisor.toml").projects["p"]


def file_store(tmp_path: Path) -> FileSecrets:
    source = KeySource("a test key", material=b"test key material")
    return FileSecrets(tmp_path / "data", source, "test")


def file_lookup(tmp_path: Path) -> BackendCredentials:
    lookup = BackendCredentials("file", tmp_path / "data", {})
    lookup.backend = file_store(tmp_path)
    return lookup


# .env.local


def test_env_file_round_trips_hostile_values(tmp_path: Path) -> None:
    write_env_file(tmp_path, HOSTILE_VALUES)
    names = list(HOSTILE_VALUES)

    seen = source_env_file(tmp_path, names)
    printed = printf_values(tmp_path, names)

    for name, value in HOSTILE_VALUES.items():
        assert seen[name] == value.encode(), name
        assert printed[name] == value.encode(), name
    assert seen["PWNED"] == b"-unset-"
    assert not list(tmp_path.glob("pwned*"))


@settings(max_examples=150, deadline=None)
@given(
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs",), blacklist_characters="\x00"
        ),
        max_size=200,
    )
)
def test_env_file_round_trips_any_text(value: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_env_file(Path(folder), {"VALUE": value})
        seen = source_env_file(Path(folder), ["VALUE"])
    assert seen["VALUE"] == value.encode()


def test_env_file_lines_are_exports(tmp_path: Path) -> None:
    write_env_file(tmp_path, {"A": "x", "B": "it's"})
    assert (
        tmp_path / ENV_FILE_NAME
    ).read_text() == "export A='x'\nexport B='it'\\''s'\n"


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_env_file_is_private_while_written(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rename comes after the content is written, so the mode of its
    # source is the mode of the file while it contains secrets under a
    # temporary name.
    modes: list[int] = []
    real_rename = os.rename

    def recording_rename(source: str | Path, target: str | Path) -> None:
        modes.append(stat.S_IMODE(os.stat(source).st_mode))
        assert Path(source).read_text() == "export SECRET='value'\n"
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", recording_rename)
    path = write_env_file(tmp_path, {"SECRET": "value"})

    assert modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_env_file_replaces_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    (tmp_path / ENV_FILE_NAME).symlink_to(target)

    path = write_env_file(tmp_path, {"SECRET": "value"})

    assert target.read_text() == "untouched"
    assert not path.is_symlink()
    assert path.read_text() == "export SECRET='value'\n"


def test_env_file_replaces_existing_file(tmp_path: Path) -> None:
    old = tmp_path / ENV_FILE_NAME
    old.write_text("export OLD='1'\n")
    old.chmod(0o644)

    write_env_file(tmp_path, {"NEW": "2"})

    assert old.read_text() == "export NEW='2'\n"
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [ENV_FILE_NAME]


@pytest.mark.parametrize("value", ["a\x00b", "lone \ud800 surrogate"])
def test_env_file_rejects_unstorable_values(tmp_path: Path, value: str) -> None:
    with pytest.raises(CredentialError, match="The value of TOKEN") as caught:
        write_env_file(tmp_path, {"TOKEN": value})
    assert value not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["MY-VAR", "1ABC", "A B", "A;touch x", ""])
def test_env_file_rejects_invalid_names(name: str) -> None:
    with pytest.raises(CredentialError, match="not a valid variable name"):
        format_env_file({name: "x"})


@pytest.mark.parametrize("name", ["MY-VAR", "1ABC"])
def test_config_rejects_invalid_variable_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid variable name"):
        project(tmp_path, f'"{name}" = "x"\n')


# resolve_env


async def test_resolve_env_reads_each_kind(tmp_path: Path) -> None:
    lookup = file_lookup(tmp_path)
    lookup.backend.set("db-pass", "from the store")  # type: ignore[union-attr]
    config = project(
        tmp_path,
        """
        PLAIN = "debug"
        LITERAL = { value = "literal secret" }
        STORED = { credential = "db-pass" }
        """,
    )

    resolved = await resolve_env(config, lookup)

    assert resolved.variables == {
        "PLAIN": "debug",
        "LITERAL": "literal secret",
        "STORED": "from the store",
    }
    assert sorted(resolved.secrets) == ["from the store", "literal secret"]


async def test_resolve_env_names_variable_and_nickname(tmp_path: Path) -> None:
    config = project(tmp_path, 'API = { credential = "missing-one" }\n')

    with pytest.raises(CredentialError) as caught:
        await resolve_env(config, file_lookup(tmp_path))

    message = str(caught.value)
    assert "API" in message
    assert "'missing-one'" in message
    assert "runvisor creds add missing-one" in message


async def test_resolve_env_rejects_stored_nul(tmp_path: Path) -> None:
    class NulStore:
        async def get(self, nickname: str) -> str:
            return "before\x00after"

    config = project(tmp_path, 'API = { credential = "nul" }\n')
    with pytest.raises(CredentialError, match="NUL byte") as caught:
        await resolve_env(config, NulStore())
    assert "before" not in str(caught.value)


async def test_lookup_sees_later_changes(tmp_path: Path) -> None:
    lookup = file_lookup(tmp_path)
    writer = file_store(tmp_path)

    writer.set("token", "first")
    assert await lookup.get("token") == "first"
    writer.set("token", "second")
    assert await lookup.get("token") == "second"


# Timeouts


class HangingBackend:
    """A backend whose calls block until released.

    A keychain that never responds cannot be produced on demand, so this
    fake replaces one. The timeout logic around it is the real one.
    """

    info = BackendInfo(kind="keyring", name="tests.HangingBackend", reason="test")

    def __init__(self) -> None:
        self.release = threading.Event()

    def get(self, nickname: str) -> str | None:
        self.release.wait(30)
        return "late"

    def set(self, nickname: str, value: str) -> None:
        self.release.wait(30)

    def delete(self, nickname: str) -> bool:
        self.release.wait(30)
        return True


async def test_hung_lookup_times_out(tmp_path: Path) -> None:
    lookup = BackendCredentials("keyring", tmp_path, {}, timeout=0.2)
    hanging = HangingBackend()
    lookup.backend = hanging
    config = project(tmp_path, 'API = { credential = "slow" }\n')

    started = time.monotonic()
    try:
        with pytest.raises(CredentialError) as caught:
            await resolve_env(config, lookup)
    finally:
        hanging.release.set()

    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "API" in message
    assert "timed out after 0.2 seconds" in message


def test_hung_calls_are_capped() -> None:
    calls = TimedCalls(timeout=0.05)
    release = threading.Event()
    try:
        for _ in range(MAX_HUNG_CALLS):
            with pytest.raises(CredentialError, match="timed out after"):
                calls.call(lambda: release.wait(30), "testing")
        started = time.monotonic()
        with pytest.raises(
            CredentialError,
            match="4 earlier calls to the credential backend have not returned",
        ):
            calls.call(lambda: True, "testing")
        assert time.monotonic() - started < 0.05
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while calls.hung and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls.hung == 0
    assert calls.call(lambda: "answer", "testing") == "answer"


def test_timed_call_passes_errors_through() -> None:
    def fail() -> None:
        raise CredentialError("backend said no")

    with pytest.raises(CredentialError, match="backend said no"):
        TimedCalls(timeout=5).call(fail, "testing")


async def test_backend_bug_fails_lookup_without_detail(tmp_path: Path) -> None:
    class BrokenBackend(HangingBackend):
        def get(self, nickname: str) -> str | None:
            raise ValueError("internal text that must not be shown")

    lookup = BackendCredentials("keyring", tmp_path, {})
    lookup.backend = BrokenBackend()
    with pytest.raises(CredentialError, match="failed with ValueError") as caught:
        await lookup.get("x")
    assert "internal text" not in str(caught.value)


# Warnings


def write_config(tmp_path: Path, env_lines: str) -> Path:
    path = tmp_path / "runvisor.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [runvisor]
            data_dir = "{tmp_path / "data"}"
            socket = "{tmp_path / "control.sock"}"

            [projects.p]
            path = "{tmp_path}"
            command = "true"
            trigger = "manual"

            [projects.p.env]
            """
        )
        + textwrap.dedent(env_lines)
    )
    return path


def test_warnings_name_unknown_nicknames(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        KNOWN = { credential = "known" }
        UNKNOWN = { credential = "not-added" }
        """,
    )
    config, errors, _ = check_config(path)
    assert config is not None
    assert errors == []

    warnings = credential_warnings(config, {"known"})

    assert warnings == [
        f"{path}:12: projects.p.env.UNKNOWN: credential 'not-added' is not "
        "stored, so runs of 'p' fail until it is added with "
        "'runvisor creds add not-added'."
    ]


def test_config_check_warns_about_short_literals(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        SHORT = { value = "abc" }
        LONG = { value = "abcd" }
        PLAIN = "ab"
        """,
    )
    _, errors, warnings = check_config(path)
    assert errors == []
    short = [warning for warning in warnings if "not masked" in warning]
    assert len(short) == 1
    assert "projects.p.env.SHORT" in short[0]
    assert "abc" not in short[0].split("SHORT")[1]
