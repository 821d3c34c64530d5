"""Hostile input from the file system and the control socket.

- Project names that try to leave their folder are rejected by the config,
  and requests that name them get clean errors.
- A `.env.local` that is a symbolic link is replaced, never written
  through: its target stays as it was, and a dangling link creates nothing.
- The control socket rejects other users (a client that runs as `nobody`),
  rejects to start on a symbolic link planted at its path, and survives
  many connections opened, half-used and dropped at once.

RUNVISOR_FAULT_CONNECTIONS sets the number of connections (default 300).
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from trio.testing import MockClock

from supervisor.config import parse_config
from supervisor.control import Client, RequestFailed
from supervisor.errors import ConfigError
from supervisor.model import RunStatus
from supervisor.protocol import (
    ConfigShowRequest,
    ErrorKind,
    ErrorReply,
    EventsRequest,
    HistoryRequest,
    LogsRequest,
    Request,
    RestartRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
    TriggerRequest,
    decode_payload,
    encode_frame,
)

from .daemon_harness import running_daemon
from .fault_tools import (
    Monitor,
    daemon_process,
    fault_count,
    open_fd_count,
    query,
    wait_until,
    write_config,
)
from .helpers import write_script

CONNECTIONS = fault_count("RUNVISOR_FAULT_CONNECTIONS", 300)

ESCAPING_NAMES = ["..", "../..", "../etc", "/etc/passwd", "a/b", ".", "", "\0"]
ESCAPING_NAMES += ["web/../..", "x" * 10_000, "web\n", "~root"]


# -- names --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", "/abs", ".hidden", "a\\b"])
def test_config_rejects_names_that_leave_their_folder(
    tmp_path: Path, name: str
) -> None:
    text = f'[projects."{name}"]\ntrigger = "manual"\npath = "{tmp_path}"\n'
    with pytest.raises(ConfigError, match="invalid project name"):
        parse_config(text, tmp_path / "runvisor.toml")


def requests_for(name: str) -> list[Request]:
    return [
        TriggerRequest(name=name),
        StartRequest(name=name),
        StopRequest(name=name),
        RestartRequest(name=name),
        StatusRequest(name=name),
        HistoryRequest(name=name),
        LogsRequest(name=name),
        LogsRequest(name=name, follow=True),
        ConfigShowRequest(name=name),
        EventsRequest(projects=[name]),
    ]


@pytest.mark.slow
def test_requests_with_escaping_names_get_clean_errors(tmp_path: Path) -> None:
    write_script(tmp_path / "web", "echo served")
    write_script(tmp_path / "other", "echo other-secret-output")
    config = write_config(
        tmp_path,
        f"""
        [projects.web]
        trigger = "manual"
        path = "{tmp_path / "web"}"

        [projects.other]
        trigger = "manual"
        path = "{tmp_path / "other"}"
        """,
    )
    db = tmp_path / "data" / "runvisor.db"
    socket_file = tmp_path / "control" / "control.sock"
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        with Client.connect(socket_file) as client:
            other = client.request(TriggerRequest(name="other"))
        wait_until(lambda: query(db, "SELECT status FROM runs") == [("succeeded",)])

        kinds = []
        for name in ESCAPING_NAMES:
            for request in requests_for(name):
                with (
                    Client.connect(socket_file) as client,
                    pytest.raises(RequestFailed) as caught,
                ):
                    client.request(request, timeout=5)
                kinds.append(caught.value.kind)
        # A run id of another project, one that does not exist, and one
        # that no run can have.
        for run_id in (getattr(other, "run_id", None), 2**62):
            with (
                Client.connect(socket_file) as client,
                pytest.raises(RequestFailed, match="has no run"),
            ):
                client.request(LogsRequest(name="web", run_id=run_id), timeout=5)
        with (
            Client.connect(socket_file) as client,
            pytest.raises(RequestFailed) as caught,
        ):
            client.request(LogsRequest(name="web", run_id=-1), timeout=5)
        assert caught.value.kind == ErrorKind.BAD_REQUEST
        assert daemon.stop() == 0
        log_text = daemon.log_text()

    assert set(kinds) == {ErrorKind.UNKNOWN_PROJECT}
    assert "internal error" not in log_text
    assert "Traceback" not in log_text


# -- .env.local -----------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
async def test_env_file_symlink_is_never_written_through(
    tmp_path: Path, fast_clock: MockClock, keep: bool
) -> None:
    folder = tmp_path / "project"
    write_script(folder, 'source ./.env.local\necho "token=${#TOKEN}"')
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    (folder / ".env.local").symlink_to(target)
    dangling_target = tmp_path / "created-by-nobody"
    other = tmp_path / "other"
    write_script(other, "echo other")
    (other / ".env.local").symlink_to(dangling_target)
    config = f"""
    [projects.project]
    trigger = "manual"
    path = "{folder}"
    keep_env_file = {str(keep).lower()}
    env = {{ TOKEN = {{ value = "s3cr3t-token" }} }}

    [projects.other]
    trigger = "manual"
    path = "{other}"
    keep_env_file = {str(keep).lower()}
    env = {{ TOKEN = {{ value = "other-token" }} }}
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("project")
        daemon.manager.trigger("other")
        (run,) = await daemon.wait_runs("project", 1)
        (other_run,) = await daemon.wait_runs("other", 1)
        lines = daemon.log_lines("project", run.id)
    assert run.status == RunStatus.SUCCEEDED
    assert other_run.status == RunStatus.SUCCEEDED
    assert lines == [("out", "token=12")]
    assert target.read_text() == "precious\n"
    assert not dangling_target.exists()
    for env_file in (folder / ".env.local", other / ".env.local"):
        assert not env_file.is_symlink()
        assert env_file.exists() == keep
        if keep:
            assert env_file.stat().st_mode & 0o777 == 0o600


def secret_project_config(folder: Path) -> str:
    """A manual project at `folder` whose TOKEN is the secret literal
    `s3cr3t-token`, so that it gets a `.env.local`."""
    return f"""
    [projects.project]
    trigger = "manual"
    path = "{folder}"
    env = {{ TOKEN = {{ value = "s3cr3t-token" }} }}
    """


async def test_env_file_that_is_a_folder_fails_the_run(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "project"
    write_script(folder, "echo started")
    (folder / ".env.local").mkdir()
    (folder / ".env.local" / "keep.txt").write_text("kept\n")
    config = secret_project_config(folder)
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("project")
        (run,) = await daemon.wait_runs("project", 1)
        lines = daemon.log_lines("project", run.id)
    assert run.status == RunStatus.FAILED
    assert run.reason == (
        f"{folder / '.env.local'} is a folder, so the run's variables cannot be "
        "written there. Remove or rename that folder."
    )
    assert "s3cr3t-token" not in run.reason
    assert ("out", "started") not in lines
    assert (folder / ".env.local" / "keep.txt").read_text() == "kept\n"
    # No temporary file is left behind.
    assert sorted(path.name for path in folder.iterdir()) == [".env.local", "run.sh"]


async def test_unremovable_env_file_is_logged(
    tmp_path: Path, fast_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The run puts a folder where its `.env.local` was, so removing it after
    # the run fails. The run's row is still written, and the daemon log
    # names the file to remove, without the secret.
    folder = tmp_path / "project"
    write_script(
        folder,
        """
        rm .env.local && mkdir .env.local && touch .env.local/keep.txt
        echo done
        """,
    )
    config = secret_project_config(folder)
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("project")
        (run,) = await daemon.wait_runs("project", 1)
        daemon.manager.trigger("project")
        runs = await daemon.wait_runs("project", 2)
    assert run.status == RunStatus.SUCCEEDED
    warnings = [
        record.getMessage()
        for record in caplog.records
        if "Failed to remove" in record.getMessage()
    ]
    assert warnings
    assert str(folder / ".env.local") in warnings[0]
    assert all("s3cr3t-token" not in message for message in warnings)
    # The project still runs; the next write fails on the folder instead.
    assert len(runs) == 2


# -- the control socket -----------------------------------------------------------

# Runs as `nobody` with the system Python (the test's interpreter may sit in
# a folder that nobody cannot enter), so it uses no runvisor code: it sends
# one frame, like the CLI, and prints what came back.
NOBODY_CLIENT = textwrap.dedent(
    """
    import socket, sys
    path, frame = sys.argv[1], bytes.fromhex(sys.argv[2])
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(path)
    except OSError as error:
        print("connect-failed", error.errno)
        sys.exit(0)
    client.sendall(frame)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    print("reply", data.hex())
    """
)


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder that other users may enter (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="runvisor-fault-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as_nobody(socket_file: Path, request: Request) -> str:
    nobody = pwd.getpwnam("nobody")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that the user nobody could run")

    def become_nobody() -> None:
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)

    result = subprocess.run(
        [python, "-c", NOBODY_CLIENT, str(socket_file), encode_frame(request).hex()],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        preexec_fn=become_nobody,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
def test_control_socket_rejects_other_users(tmp_path: Path, shared_root: Path) -> None:
    write_script(tmp_path / "web", "exec -a fault-web sleep 1000")
    socket_dir = shared_root / "control"
    socket_dir.mkdir(mode=0o700)
    socket_file = socket_dir / "control.sock"
    config = tmp_path / "runvisor.toml"
    config.write_text(
        f'[runvisor]\ndata_dir = "{tmp_path / "data"}"\nsocket = "{socket_file}"\n'
        f'[projects.web]\ntrigger = "manual"\npath = "{tmp_path / "web"}"\n'
    )
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        # The file permissions stop another user first.
        first = run_as_nobody(socket_file, TriggerRequest(id=1, name="web"))

        # Past wrong permissions, the peer's user id stops it.
        socket_dir.chmod(0o711)
        socket_file.chmod(0o666)
        second = run_as_nobody(socket_file, TriggerRequest(id=1, name="web"))
        with Client.connect(socket_file) as client:
            client.request(StatusRequest())
        assert daemon.stop() == 0
        log_text = daemon.log_text()

    assert first == f"connect-failed {errno.EACCES}"
    kind, _, payload = second.partition(" ")
    assert kind == "reply"
    reply = decode_payload(bytes.fromhex(payload)[4:])
    assert isinstance(reply, ErrorReply)
    assert reply.kind == ErrorKind.PERMISSION_DENIED
    assert f"user id {pwd.getpwnam('nobody').pw_uid}" in log_text
    assert not (tmp_path / "data" / "logs" / "web").exists()


def test_symlink_at_the_socket_path_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("not a socket\n")
    config = write_config(tmp_path, "")
    socket_file = tmp_path / "control" / "control.sock"
    socket_file.symlink_to(target)
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "symbolic link" in result.stderr
    assert str(socket_file) in result.stderr
    assert "Traceback" not in result.stderr
    assert socket_file.is_symlink()
    assert target.read_text() == "not a socket\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_many_connections_opened_and_dropped(tmp_path: Path) -> None:
    write_script(tmp_path / "web", "exec -a fault-web sleep 1000")
    config = write_config(
        tmp_path,
        f"""
        [projects.web]
        trigger = "always_running"
        path = "{tmp_path / "web"}"
        """,
    )
    socket_file = tmp_path / "control" / "control.sock"
    frame = encode_frame(StatusRequest(id=1))
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        idle_descriptors = open_fd_count(daemon.pid)
        with Monitor(socket_file, daemon.pid) as monitor:
            clients = []
            for index in range(CONNECTIONS):
                client = socket.socket(socket.AF_UNIX)
                # Blocking: a full listen backlog makes a non-blocking
                # connect fail at once instead of waiting for the accept.
                client.connect(str(socket_file))
                # Nothing, half a header, a header promising 2 GB, garbage,
                # half a frame, and a whole request whose reply is never read.
                sends = [
                    b"",
                    frame[:2],
                    struct.pack(">I", 2**31),
                    b"\xc1" * 64,
                    frame[:-1],
                    frame * 3,
                ]
                client.sendall(sends[index % len(sends)])
                clients.append(client)
            for index, client in enumerate(clients):
                if index % 2:
                    # Reset instead of an orderly close.
                    client.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                client.close()
            wait_until(
                lambda: open_fd_count(daemon.pid) <= idle_descriptors + 2, timeout=20
            )
        monitor.check()
        assert daemon.stop() == 0
        log_text = daemon.log_text()
    assert "internal error" not in log_text
    assert "Traceback" not in log_text
