"""The single executable: start-up imports, loader variables, signals through
the bootloader, a temp cleaner that deletes the unpacked folder, and keyring
backends compared with the source tree.

Every test runs the real command line in real time. Tests that take
`runvisor_command` run the source tree under `make test` and the
executable under `make test-frozen`. Tests that take `binary` check what
only the executable has (its bootloader, its `_MEI*` folder, the source
tree and the executable side by side) and skip without RUNVISOR_BINARY.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from .helpers import marked_pids, wait_until_gone, write_script
from .secret_service import SecretService, running_secret_service
from .serve_process import (
    config_text,
    fresh_environment,
    serving,
    unpacked_folders,
)

pytestmark = pytest.mark.frozen

SOURCE_COMMAND = [sys.executable, "-m", "supervisor"]

# Libraries that `--version` and `--help` must not import: each costs
# milliseconds to tens of milliseconds at every start.
HEAVY_MODULES = frozenset(
    {
        "trio",
        "msgspec",
        "keyring",
        "sqlite_utils",
        "prompt_toolkit",
        "cryptography",
        "croniter",
        "cron_descriptor",
        "tomlkit",
        "h11",
        "platformdirs",
        "secretstorage",
        "jeepney",
    }
)

REPORTED_LIBRARIES = (
    "trio",
    "croniter",
    "keyring",
    "sqlite-utils",
    "msgspec",
    "prompt_toolkit",
    "platformdirs",
    "tomlkit",
    "h11",
    "cryptography",
    "cron-descriptor",
)

# The daemon must keep working for at least a minute after a temp cleaner
# ran. Only a file read from the deleted folder could break it, and each
# command below reads what it needs when it runs, so several rounds within
# 10 s check the same as 60 s would, in a sixth of the time.
CLEANER_CHECK_SECONDS = 10.0

# A project that writes bye.txt and exits 0 on SIGTERM. It writes
# trapped.txt once its trap is set: a signal before that would kill it.
TERM_TRAP_SCRIPT = """
exec -a f21-term bash -c '
  trap "echo bye >> bye.txt; exit 0" TERM
  echo trapped > trapped.txt
  while :; do sleep 0.2; done
'
"""


@pytest.fixture
def binary() -> Path:
    path = os.environ.get("RUNVISOR_BINARY")
    if not path:
        pytest.skip("needs the single executable: run `make test-frozen`")
    return Path(path).resolve()


def run_cli(
    command: Sequence[str],
    config: Path,
    *args: str,
    env: Mapping[str, str],
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def read_when_written(path: Path, timeout: float, log: str = "") -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written within {timeout:g} s\n{log}")
        time.sleep(0.05)
    return path.read_text()


def term_trap_project(tmp_path: Path, name: str = "a") -> str:
    write_script(tmp_path / name, TERM_TRAP_SCRIPT)
    return (
        f"[projects.{name}]\n"
        'trigger = "always_running"\n'
        f'path = "{tmp_path / name}"\n'
        'stop_timeout = "3s"\n'
    )


def output_project(tmp_path: Path, name: str, body: str, env: str = "") -> str:
    """A project that writes one line to out.txt in its folder and exits."""
    write_script(tmp_path / name, body + " > out.txt\n")
    return (
        f"[projects.{name}]\n"
        'trigger = "always_running"\n'
        'restart = "never"\n'
        f'path = "{tmp_path / name}"\n' + env
    )


# Start-up


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_version_and_help_import_nothing_heavy(option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "supervisor", option],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "supervisor" in imported
    assert sorted(imported & HEAVY_MODULES) == []


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_binary_version_and_help(binary: Path, tmp_path: Path, option: str) -> None:
    env = fresh_environment(tmp_path)

    result = subprocess.run(
        [str(binary), option], capture_output=True, text=True, env=env, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert "runvisor" in result.stdout
    assert unpacked_folders(env) == []


def test_binary_carries_backends_not_setuptools(binary: Path) -> None:
    archives = pytest.importorskip(
        "PyInstaller.archive.readers",
        reason="needs PyInstaller: pip install -e '.[build]'",
    )
    executable = archives.CArchiveReader(str(binary))
    modules = set(executable.open_embedded_archive("PYZ.pyz").toc)
    entries = set(executable.toc)

    for module in (
        "keyring.backends.SecretService",
        "keyring.backends.kwallet",
        "keyring.backends.chainer",
        "keyring.backends.fail",
        "keyring.backends.null",
        "secretstorage",
        "jeepney",
        "cryptography.hazmat.primitives.ciphers.aead",
        "cryptography.hazmat.primitives.kdf.scrypt",
    ):
        assert module in modules
    assert "cryptography/hazmat/bindings/_rust.abi3.so" in entries
    # keyring finds its backends through the entry points in its metadata.
    assert any(
        name.startswith("keyring-") and name.endswith(".dist-info/entry_points.txt")
        for name in entries
    )
    left_out = ("setuptools", "pkg_resources", "pyi_rth_pkgres", "pyi_rth_setuptools")
    assert sorted(name for name in modules | entries if name.startswith(left_out)) == []
    # The runtime hook that loads the unpacked files early for the daemon.
    assert "preload" in entries


def test_version_verbose_lists_libraries(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, ""))

    text = run_cli(runvisor_command, config, "version", "--verbose", env=env)
    document = run_cli(runvisor_command, config, "version", "--json", env=env)

    assert text.returncode == 0, text.stderr
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in text.stdout
    assert document.returncode == 0, document.stderr
    report = json.loads(document.stdout)
    missing = [name for name in REPORTED_LIBRARIES if not report["libraries"][name]]
    assert missing == []
    for name in REPORTED_LIBRARIES:
        assert f"{name} " in text.stdout
    assert report["frozen"] is bool(os.environ.get("RUNVISOR_BINARY"))
    backends = [entry["class"] for entry in report["keyring_backends"]]
    assert "keyring.backends.fail.Keyring" in backends


def test_normal_exit_leaves_no_unpacked_folder(binary: Path, tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, ""))

    # status without a daemon exits 3 and prints what the store holds.
    for args, expected_code in (
        (["status"], 3),
        (["config", "check"], 0),
        (["version", "--verbose"], 0),
    ):
        result = run_cli([str(binary)], config, *args, env=env)
        assert result.returncode == expected_code, result.stderr

    assert unpacked_folders(env) == []


# Loader variables


@pytest.mark.parametrize("value", [None, "/opt/vendor/lib"])
def test_children_see_the_users_library_path(
    runvisor_command: list[str], tmp_path: Path, value: str | None
) -> None:
    env = fresh_environment(tmp_path)
    env.pop("LD_LIBRARY_PATH", None)
    if value is not None:
        env["LD_LIBRARY_PATH"] = value
    project = output_project(
        tmp_path, "ld", 'echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH-<unset>}"'
    )
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, project))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        seen = read_when_written(tmp_path / "ld" / "out.txt", 10, daemon.log())

    expected = "<unset>" if value is None else value
    assert seen == f"LD_LIBRARY_PATH={expected}\n"


# Signals


def test_sigterm_stops_runs_and_exits_zero(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, term_trap_project(tmp_path)))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        read_when_written(tmp_path / "a" / "trapped.txt", 10, daemon.log())
        stopping_since = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit()
        stop_seconds = time.monotonic() - stopping_since

    assert code == 0, daemon.log()
    # Within the project's stop_timeout (3 s) plus 2 s.
    assert stop_seconds < 5.0
    assert (tmp_path / "a" / "bye.txt").read_text() == "bye\n"
    assert marked_pids("f21-term") == []
    assert unpacked_folders(env) == []
    assert "STOPPING=1" in daemon.notify.states()


def test_sighup_reloads_and_keeps_running(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    first = term_trap_project(tmp_path)
    config.write_text(config_text(tmp_path, first))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        added = output_project(tmp_path, "b", "echo added")
        config.write_text(config_text(tmp_path, first + added))
        daemon.send(signal.SIGHUP)
        seen = read_when_written(tmp_path / "b" / "out.txt", 10, daemon.log())
        still_running = daemon.process.poll() is None
        read_when_written(tmp_path / "a" / "trapped.txt", 10, daemon.log())
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit()

    assert seen == "added\n"
    assert still_running
    assert code == 0, daemon.log()
    assert (tmp_path / "a" / "bye.txt").read_text() == "bye\n"


def test_sigint_stops_like_sigterm(runvisor_command: list[str], tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, term_trap_project(tmp_path)))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        read_when_written(tmp_path / "a" / "trapped.txt", 10, daemon.log())
        daemon.send(signal.SIGINT)
        code = daemon.wait_exit()

    assert code == 0, daemon.log()
    assert (tmp_path / "a" / "bye.txt").read_text() == "bye\n"
    assert unpacked_folders(env) == []


def test_ctrl_c_reaches_runvisor_not_runs(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    # Ctrl-C sends SIGINT to the whole foreground process group: here the
    # bootloader and runvisor both get it, and the bootloader forwards its
    # copy as well. Runs lead their own sessions and must only see the
    # stop signal that runvisor sends them.
    env = fresh_environment(tmp_path)
    write_script(
        tmp_path / "a",
        """
        exec -a f21-int bash -c '
          trap "echo int >> signals.txt" INT
          trap "echo term >> signals.txt; exit 0" TERM
          echo trapped > trapped.txt
          while :; do sleep 0.2; done
        '
        """,
    )
    project = f'[projects.a]\ntrigger = "always_running"\npath = "{tmp_path / "a"}"\n'
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, project))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        read_when_written(tmp_path / "a" / "trapped.txt", 10, daemon.log())
        os.killpg(daemon.pid, signal.SIGINT)
        code = daemon.wait_exit()

    assert code == 0, daemon.log()
    assert (tmp_path / "a" / "signals.txt").read_text() == "term\n"
    assert wait_until_gone("f21-int", 5) == []


# Temp cleaner


def test_daemon_survives_a_temp_cleaner(binary: Path, tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    env["RUNVISOR_CREDENTIALS_KEY"] = "test key material for the file store"
    config = tmp_path / "runvisor.toml"
    base = term_trap_project(tmp_path)
    config.write_text(config_text(tmp_path, base))
    command = [str(binary)]
    added = run_cli(command, config, "creds", "add", "X", env=env, stdin="v1\n")
    assert added.returncode == 0, added.stderr

    with serving(command, config, tmp_path, env) as daemon:
        unpacked = unpacked_folders(env)
        # What a temp cleaner does to a folder it finds old enough.
        for name in unpacked:
            subprocess.run(["rm", "-rf", os.path.join(env["TMPDIR"], name)], check=True)

        rounds = 0
        projects = base
        deadline = time.monotonic() + CLEANER_CHECK_SECONDS
        while rounds < 2 or time.monotonic() < deadline:
            rounds += 1
            status = run_cli(command, config, "status", env=env)
            assert status.returncode == 0, status.stderr
            assert "a " in status.stdout

            # A reload that adds a manual project, then a run of it, which
            # gets the credential X from the daemon's file store.
            name = f"m{rounds}"
            write_script(tmp_path / name, 'echo "X=$X" > out.txt')
            projects += (
                f'[projects.{name}]\ntrigger = "manual"\npath = "{tmp_path / name}"\n'
                f'[projects.{name}.env]\nX = {{ credential = "X" }}\n'
            )
            config.write_text(config_text(tmp_path, projects))
            reload = run_cli(command, config, "reload", env=env)
            assert reload.returncode == 0, reload.stdout + reload.stderr
            started = run_cli(command, config, "trigger", name, env=env)
            assert started.returncode == 0, started.stdout + started.stderr
            seen = read_when_written(tmp_path / name / "out.txt", 10, daemon.log())
            assert seen == "X=v1\n"

            secret = run_cli(command, config, "creds", "get", "X", env=env)
            assert secret.returncode == 0, secret.stderr
            assert secret.stdout == "v1"

        assert daemon.process.poll() is None, daemon.log()
        read_when_written(tmp_path / "a" / "trapped.txt", 10, daemon.log())
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit()

    assert len(unpacked) == 1
    assert code == 0, daemon.log()
    assert (tmp_path / "a" / "bye.txt").read_text() == "bye\n"
    assert unpacked_folders(env) == []
    assert "Traceback" not in daemon.log()


# Keyring backends


@pytest.fixture
def secret_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SecretService]:
    # A folder with a short path: the bus socket's path must fit in 107 bytes.
    with running_secret_service(tmp_path_factory.mktemp("bus")) as service:
        yield service


def check_same_credentials(
    binary: Path, tmp_path: Path, env: dict[str, str], backend: str
) -> dict[str, str]:
    """Store and read credentials from the source tree and the executable
    crosswise, then check that a run of the executable's daemon gets one.

    Returns the backend that `creds backend --json` reports for both.
    """
    source, frozen = SOURCE_COMMAND, [str(binary)]
    project = output_project(
        tmp_path,
        "p",
        'echo "X=$X"',
        env='[projects.p.env]\nX = { credential = "X" }\n',
    )
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, project, credentials=backend))

    reports = []
    for command in (source, frozen):
        result = run_cli(command, config, "creds", "backend", "--json", env=env)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stdout))
    assert reports[1]["kind"] == reports[0]["kind"]
    assert reports[1]["name"] == reports[0]["name"]

    for writer, reader, nickname, value in (
        (source, frozen, "X", "v1"),
        (frozen, source, "Y", "w1"),
    ):
        added = run_cli(
            writer, config, "creds", "add", nickname, env=env, stdin=value + "\n"
        )
        assert added.returncode == 0, added.stderr
        read = run_cli(reader, config, "creds", "get", nickname, env=env)
        assert read.returncode == 0, read.stderr
        assert read.stdout == value

    with serving(frozen, config, tmp_path, env) as daemon:
        seen = read_when_written(tmp_path / "p" / "out.txt", 10, daemon.log())
    assert seen == "X=v1\n"
    report: dict[str, str] = reports[0]
    return report


def test_secret_service_same_as_source(
    binary: Path, tmp_path: Path, secret_service: SecretService
) -> None:
    env = fresh_environment(tmp_path)
    env["HOME"] = str(secret_service.home)
    env["DBUS_SESSION_BUS_ADDRESS"] = secret_service.address

    report = check_same_credentials(binary, tmp_path, env, backend="keyring")

    assert report["kind"] == "keyring"
    assert report["name"] == "keyring.backends.SecretService.Keyring"


def test_secret_service_named_by_variable(
    binary: Path, tmp_path: Path, secret_service: SecretService
) -> None:
    env = fresh_environment(tmp_path)
    env["HOME"] = str(secret_service.home)
    env["DBUS_SESSION_BUS_ADDRESS"] = secret_service.address
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.SecretService.Keyring"

    report = check_same_credentials(binary, tmp_path, env, backend="keyring")

    assert report["name"] == "keyring.backends.SecretService.Keyring"
    assert "PYTHON_KEYRING_BACKEND" in report["reason"]


def test_secret_service_backend_in_version(
    binary: Path, tmp_path: Path, secret_service: SecretService
) -> None:
    env = fresh_environment(tmp_path)
    env["HOME"] = str(secret_service.home)
    env["DBUS_SESSION_BUS_ADDRESS"] = secret_service.address
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, ""))

    backends = []
    for command in (SOURCE_COMMAND, [str(binary)]):
        result = run_cli(command, config, "version", "--json", env=env)
        assert result.returncode == 0, result.stderr
        backends.append(json.loads(result.stdout)["keyring_backends"])

    assert backends[1] == backends[0]
    assert {"class": "keyring.backends.SecretService.Keyring", "priority": 5} in (
        backends[1]
    )


def test_file_store_same_as_source(binary: Path, tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    env["RUNVISOR_CREDENTIALS_KEY"] = "test key material for the file store"

    report = check_same_credentials(binary, tmp_path, env, backend="file")

    assert report["kind"] == "file"
