"""Credentials in runs, through a real daemon: `.env.local`, failures before
`run.sh` starts, backend choice, and masking everywhere the daemon writes.

Credentials are stored with the real CLI in a subprocess, as a person would,
and the daemon reads them from the same data dir.
"""

from __future__ import annotations

import hashlib
import logging
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from trio.testing import MockClock

from supervisor.credential_file import KEY_FILE_NAME, STORE_FILE_NAME
from supervisor.credentials import BackendCredentials
from supervisor.model import RunStatus

from .credential_helpers import HOSTILE_SECRET, Cli, base_environment, write_config
from .daemon_harness import Harness, running_daemon
from .helpers import write_script
from .secret_service import SecretService, running_secret_service
from .test_credentials import HangingBackend

NO_KEYRING_MESSAGE = (
    "No usable keyring backend was found. Start a Secret Service for this "
    "user's D-Bus session (such as gnome-keyring-daemon), or set backend = "
    '"file" in [credentials] to use the encrypted file store.'
)


@pytest.fixture
def no_keychain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the daemon as on a headless host: no D-Bus session, no display,
    and no keyring backend named in the environment."""
    for name in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "")
    monkeypatch.delenv("RUNVISOR_CREDENTIALS_KEY", raising=False)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def cli_for(tmp_path: Path, backend: str, env: dict[str, str] | None = None) -> Cli:
    """A CLI on the daemon's data dir, with a config file of its own."""
    config = write_config(tmp_path, backend, name="cli.toml")
    return Cli(config, env if env is not None else base_environment(tmp_path))


def sha256_line(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest() + "  -\n"


async def trigger_and_wait(daemon: Harness, name: str, count: int = 1) -> float:
    """Trigger a run and wait for it to finish; return the real seconds."""
    started = time.monotonic()
    daemon.manager.trigger(name)
    await daemon.wait_runs(name, count)
    return time.monotonic() - started


async def test_env_file_survives_shell_metacharacters(
    tmp_path: Path, fast_clock: MockClock, no_keychain: None, umask_022: None
) -> None:
    folder = tmp_path / "f14"
    print_child = 'import os; print(os.environ["EQ"] + "|" + os.environ["DOLLAR"])'
    write_script(
        folder,
        f"""
        set -euo pipefail
        source ./.env.local
        printf '%s' "$DB_PASS"  | sha256sum > db.sha
        printf '%s' "$GREETING" | sha256sum > greet.sha
        python3 -c '{print_child}' > child.txt
        stat -c %a .env.local > mode.txt
        """,
    )
    cli = cli_for(tmp_path, "auto")
    cli.run("creds", "add", "DB_PASS", stdin=HOSTILE_SECRET.encode(), check=True)
    config = f"""
    [projects.f14]
    path = "{folder}"
    trigger = "manual"

    [projects.f14.env]
    DB_PASS = {{ credential = "DB_PASS" }}
    GREETING = {{ value = "hello  world " }}
    EQ = "a=b=c"
    DOLLAR = '$1$abc$xyz'
    """
    async with running_daemon(tmp_path, config) as daemon:
        await trigger_and_wait(daemon, "f14")
        (run,) = await daemon.history("f14")

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.exit_code == 0
    assert (folder / "db.sha").read_text() == sha256_line(HOSTILE_SECRET)
    assert (folder / "greet.sha").read_text() == sha256_line("hello  world ")
    assert (folder / "child.txt").read_text() == "a=b=c|$1$abc$xyz\n"
    assert (folder / "mode.txt").read_text() == "600\n"
    assert not Path("/tmp/f14-pwned").exists()
    assert not Path("/tmp/f14-pwned2").exists()
    assert not (folder / ".env.local").exists()
    got = cli.run("creds", "get", "DB_PASS", check=True)
    assert got.stdout == HOSTILE_SECRET.encode()


def no_keychain_projects(tmp_path: Path, backend: str) -> str:
    for name in ("p1", "p2"):
        write_script(
            tmp_path / name,
            f"""
            echo started >> started.log
            printf '%s' "${{API_TOKEN:-literal only}}" > seen.txt
            echo "{name} ran"
            """,
        )
    return f"""
    [credentials]
    backend = "{backend}"

    [projects.p1]
    path = "{tmp_path / "p1"}"
    trigger = "manual"
    env = {{ GREETING = {{ value = "hello there" }}, LEVEL = "debug" }}

    [projects.p2]
    path = "{tmp_path / "p2"}"
    trigger = "manual"
    env = {{ API_TOKEN = {{ credential = "API_TOKEN" }} }}
    """


async def test_no_keychain_fails_runs_not_daemon(
    tmp_path: Path,
    fast_clock: MockClock,
    no_keychain: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = no_keychain_projects(tmp_path, "keyring")

    async with running_daemon(tmp_path, config) as daemon:
        await trigger_and_wait(daemon, "p1", 1)
        elapsed = await trigger_and_wait(daemon, "p2")
        (failed,) = await daemon.history("p2")
        log = daemon.log_lines("p2", failed.id)
        # The daemon is still up and runs other projects.
        await trigger_and_wait(daemon, "p1", 2)
        p1_runs = await daemon.history("p1")

    assert [run.status for run in p1_runs] == [RunStatus.SUCCEEDED] * 2
    assert (tmp_path / "p1" / "seen.txt").read_text() == "literal only"

    assert elapsed < 5
    assert failed.status == RunStatus.FAILED
    assert failed.reason == (
        f"Cannot resolve API_TOKEN from credential 'API_TOKEN'. {NO_KEYRING_MESSAGE}"
    )
    assert "\n" not in failed.reason
    assert log == [("err", f"runvisor: {failed.reason}")]
    assert not (tmp_path / "p2" / "started.log").exists()
    assert not (tmp_path / "p2" / ".env.local").exists()
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
    failure_lines = [
        record.getMessage()
        for record in caplog.records
        if "failed to start" in record.getMessage()
    ]
    assert len(failure_lines) == 1
    assert "API_TOKEN" in failure_lines[0]

    cli = cli_for(tmp_path, "keyring")
    added = cli.run("creds", "add", "API_TOKEN", stdin=b"token-value-1234")
    assert added.returncode == 1
    assert added.stderr.decode() == f"runvisor: {NO_KEYRING_MESSAGE}\n"


async def test_auto_uses_file_store_without_keychain(
    tmp_path: Path,
    fast_clock: MockClock,
    no_keychain: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = no_keychain_projects(tmp_path, "auto")
    cli = cli_for(tmp_path, "auto")
    cli.run("creds", "add", "API_TOKEN", stdin=b"stored-token-4711\n", check=True)

    async with running_daemon(tmp_path, config) as daemon:
        await trigger_and_wait(daemon, "p2")
        (run,) = await daemon.history("p2")
        log = daemon.log_lines("p2", run.id)

    data = tmp_path / "data"
    start_lines = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("credentials:")
    ]
    assert start_lines == [
        f"credentials: encrypted file {data / STORE_FILE_NAME}, key from the key "
        f'file {data / KEY_FILE_NAME} (backend = "auto" and no usable keyring '
        "backend was found)"
    ]
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert (tmp_path / "p2" / "seen.txt").read_text() == "stored-token-4711"
    assert log == [("out", "p2 ran")]


async def test_unknown_nickname_fails_before_start(
    tmp_path: Path,
    fast_clock: MockClock,
    no_keychain: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    folder = tmp_path / "app"
    write_script(folder, "echo started >> started.log")
    config = f"""
    [credentials]
    backend = "file"

    [projects.app]
    path = "{folder}"
    trigger = "manual"
    env = {{ NOTION_KEY = {{ credential = "my-notion" }} }}
    """

    async with running_daemon(tmp_path, config) as daemon:
        elapsed = await trigger_and_wait(daemon, "app")
        (run,) = await daemon.history("app")
        log = daemon.log_lines("app", run.id)
        outcome = await daemon.daemon.reload()

    assert elapsed < 5
    assert run.status == RunStatus.FAILED
    assert run.reason.startswith(
        "Cannot resolve NOTION_KEY from credential 'my-notion'. The credential "
        "is not in the encrypted file store"
    )
    assert run.reason.endswith("Add it with 'runvisor creds add my-notion'.")
    assert log == [("err", f"runvisor: {run.reason}")]
    assert not (folder / "started.log").exists()
    assert not (folder / ".env.local").exists()

    unknown = "credential 'my-notion' is not stored"
    lines = daemon.config_path.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "NOTION_KEY" in text)
    assert outcome.ok
    assert [w for w in outcome.warnings if unknown in w] == [
        f"{daemon.config_path}:{line}: projects.app.env.NOTION_KEY: {unknown}, so "
        "runs of 'app' fail until it is added with 'runvisor creds add my-notion'."
    ]
    start_warnings = [
        record.getMessage()
        for record in caplog.records
        if unknown in record.getMessage()
    ]
    assert len(start_warnings) == 2


async def test_hung_keychain_fails_run_with_timeout(
    tmp_path: Path, fast_clock: MockClock, no_keychain: None
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "echo started >> started.log")
    config = f"""
    [projects.app]
    path = "{folder}"
    trigger = "manual"
    env = {{ TOKEN = {{ credential = "slow" }} }}
    """
    lookup = BackendCredentials("keyring", tmp_path, {}, timeout=0.2)
    hanging = HangingBackend()
    lookup.backend = hanging

    try:
        async with running_daemon(tmp_path, config) as daemon:
            daemon.manager.context.credentials = lookup
            elapsed = await trigger_and_wait(daemon, "app")
            (run,) = await daemon.history("app")
    finally:
        hanging.release.set()

    assert elapsed < 5
    assert run.status == RunStatus.FAILED
    assert run.reason.startswith(
        "Cannot resolve TOKEN from credential 'slow'. The credential backend "
        "timed out after 0.2 seconds while reading credential 'slow'."
    )
    assert not (folder / "started.log").exists()


async def test_runs_see_changes_and_env_file_lifetime(
    tmp_path: Path, fast_clock: MockClock, no_keychain: None
) -> None:
    for name in ("plain", "kept"):
        write_script(
            tmp_path / name,
            """
            printf '%s' "$TOKEN" >> from-environment.txt
            echo >> from-environment.txt
            ls -a > listing.txt
            """,
        )
    config = f"""
    [credentials]
    backend = "file"

    [projects.plain]
    path = "{tmp_path / "plain"}"
    trigger = "manual"
    env = {{ TOKEN = {{ credential = "token" }} }}

    [projects.kept]
    path = "{tmp_path / "kept"}"
    trigger = "manual"
    keep_env_file = true
    env = {{ TOKEN = {{ credential = "token" }} }}
    """
    cli = cli_for(tmp_path, "file")
    cli.run("creds", "add", "token", stdin=b"first-value", check=True)

    async with running_daemon(tmp_path, config) as daemon:
        await trigger_and_wait(daemon, "plain", 1)
        cli.run("creds", "update", "token", stdin=b"second-value", check=True)
        await trigger_and_wait(daemon, "plain", 2)
        await trigger_and_wait(daemon, "kept", 1)

    plain = tmp_path / "plain"
    kept_file = tmp_path / "kept" / ".env.local"
    assert (plain / "from-environment.txt").read_text() == (
        "first-value\nsecond-value\n"
    )
    assert ".env.local" in (plain / "listing.txt").read_text().split()
    assert not (plain / ".env.local").exists()
    assert kept_file.read_text() == "export TOKEN='second-value'\n"
    assert kept_file.stat().st_mode & 0o777 == 0o600


async def test_reload_switches_backend(
    tmp_path: Path, fast_clock: MockClock, no_keychain: None
) -> None:
    folder = tmp_path / "app"
    write_script(folder, 'printf "%s" "$TOKEN" > seen.txt')
    project = f"""
    [projects.app]
    path = "{folder}"
    trigger = "manual"
    env = {{ TOKEN = {{ credential = "token" }} }}
    """
    cli = cli_for(tmp_path, "file")
    cli.run("creds", "add", "token", stdin=b"file-store-value", check=True)

    async with running_daemon(
        tmp_path, '[credentials]\nbackend = "keyring"\n' + project
    ) as daemon:
        await trigger_and_wait(daemon, "app", 1)
        daemon.write_config('[credentials]\nbackend = "file"\n' + project)
        outcome = await daemon.daemon.reload()
        await trigger_and_wait(daemon, "app", 2)
        first, second = sorted(await daemon.history("app"), key=lambda r: r.id)

    assert outcome.ok
    assert first.status == RunStatus.FAILED
    assert "No usable keyring backend" in first.reason
    assert second.status == RunStatus.SUCCEEDED, second.reason
    assert (folder / "seen.txt").read_text() == "file-store-value"


# Masking


async def test_secrets_never_reach_daemon_files(
    tmp_path: Path,
    fast_clock: MockClock,
    no_keychain: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stored = "stored-secret-8d1f"
    multiline = "first-line-4e2a\nsecond-line-77c1"
    literal = "literal-secret-b3c9"
    secrets = [stored, literal, *multiline.split("\n")]

    write_script(
        tmp_path / "leaky",
        """
        echo "token=$STORED in a line"
        echo "$STORED" >&2
        printf '%s\\n' "$MULTI"
        echo "literal=$LITERAL; plain=$PLAIN"
        ps -eo args > ps.txt
        echo "exit reason: $STORED"
        exit 3
        """,
    )
    write_script(tmp_path / "broken", "echo never")
    config = f"""
    [credentials]
    backend = "file"

    [projects.leaky]
    path = "{tmp_path / "leaky"}"
    trigger = "manual"

    [projects.leaky.env]
    STORED = {{ credential = "stored" }}
    MULTI = {{ credential = "multi" }}
    LITERAL = {{ value = "{literal}" }}
    PLAIN = "plain-value-visible"

    [projects.broken]
    path = "{tmp_path / "broken"}"
    trigger = "manual"
    env = {{ STORED = {{ credential = "stored" }}, GONE = {{ credential = "gone" }} }}
    """
    cli = cli_for(tmp_path, "file")
    cli.run("creds", "add", "stored", stdin=stored.encode(), check=True)
    cli.run("creds", "add", "multi", stdin=multiline.encode(), check=True)

    async with running_daemon(tmp_path, config) as daemon:
        await trigger_and_wait(daemon, "leaky")
        await trigger_and_wait(daemon, "broken")
        (leaky,) = await daemon.history("leaky")
        (broken,) = await daemon.history("broken")
        log = daemon.log_lines("leaky", leaky.id)
        events = list(daemon.events)

    assert leaky.status == RunStatus.FAILED
    assert broken.status == RunStatus.FAILED
    assert ("out", "token=*** in a line") in log
    assert ("err", "***") in log
    assert ("out", "literal=***; plain=plain-value-visible") in log
    assert ("out", "***") in log

    ps_output = (tmp_path / "leaky" / "ps.txt").read_text()
    assert "ps -eo args" in ps_output
    written = {
        str(path): path.read_bytes()
        for path in (tmp_path / "data").rglob("*")
        if path.is_file()
    }
    assert any(name.endswith("runvisor.db") for name in written)
    assert any("/logs/" in name for name in written)
    written["events"] = b"\n".join(msgspec.json.encode(event) for event in events)
    written["daemon log"] = "\n".join(
        record.getMessage() for record in caplog.records
    ).encode()
    written["ps"] = ps_output.encode()
    for secret in secrets:
        for source, content in written.items():
            assert secret.encode() not in content, f"{secret!r} found in {source}"
    assert not (tmp_path / "leaky" / ".env.local").exists()


# A real Secret Service


@pytest.fixture(scope="module")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretService]:
    with running_secret_service(tmp_path_factory.mktemp("secret-service")) as service:
        yield service


async def test_run_reads_secret_service(
    tmp_path: Path,
    fast_clock: MockClock,
    secret_service: SecretService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    env = base_environment(tmp_path)
    env["DBUS_SESSION_BUS_ADDRESS"] = secret_service.address
    cli = cli_for(tmp_path, "keyring", env)
    cli.run("creds", "add", "kr-run", stdin=HOSTILE_SECRET.encode(), check=True)

    folder = tmp_path / "app"
    write_script(
        folder,
        """
        set -euo pipefail
        source ./.env.local
        printf '%s' "$TOKEN" | sha256sum > token.sha
        """,
    )
    config = textwrap.dedent(
        f"""
        [credentials]
        backend = "keyring"

        [projects.app]
        path = "{folder}"
        trigger = "manual"
        env = {{ TOKEN = {{ credential = "kr-run" }} }}
        """
    )
    try:
        async with running_daemon(tmp_path, config) as daemon:
            await trigger_and_wait(daemon, "app")
            (run,) = await daemon.history("app")
    finally:
        cli.run("creds", "delete", "kr-run", "--force")

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert (folder / "token.sha").read_text() == sha256_line(HOSTILE_SECRET)
    assert any(
        record.getMessage().startswith(
            "credentials: OS keychain through keyring "
            "(keyring.backends.SecretService.Keyring)"
        )
        for record in caplog.records
    )


async def test_stale_env_file_removed_at_start(
    tmp_path: Path, fast_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A daemon killed during a run cannot remove `.env.local`; the next one
    # removes it before any run starts, except where it is to be kept.
    caplog.set_level(logging.WARNING)
    stale = "export TOKEN='left-by-a-crash'\n"
    for name in ("plain", "kept"):
        write_script(tmp_path / name, "echo run")
        (tmp_path / name / ".env.local").write_text(stale)
    # A folder under that name is no leftover: it stays, without a warning.
    write_script(tmp_path / "odd", "echo run")
    (tmp_path / "odd" / ".env.local").mkdir()
    config = f"""
    [projects.odd]
    path = "{tmp_path / "odd"}"
    trigger = "manual"

    [projects.plain]
    path = "{tmp_path / "plain"}"
    trigger = "manual"

    [projects.kept]
    path = "{tmp_path / "kept"}"
    trigger = "manual"
    keep_env_file = true
    """
    async with running_daemon(tmp_path, config):
        assert not (tmp_path / "plain" / ".env.local").exists()
        assert (tmp_path / "kept" / ".env.local").read_text() == stale
        assert (tmp_path / "odd" / ".env.local").is_dir()
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "odd" in message]
    assert f"removed {tmp_path / 'plain'}/.env.local, found at start-up" in (messages)
    assert all("left-by-a-crash" not in message for message in messages)
