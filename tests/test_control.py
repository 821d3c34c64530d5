"""The control socket: a private, race-free listening socket, the server
behind it, and the blocking client, over real Unix sockets.

The daemon runs in the test's trio run (see `daemon_harness`); the blocking
client runs in worker threads, as the CLI would run it in its own process.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import trio
import trio.lowlevel
from trio.testing import MockClock

from supervisor.config import find_config_path, load_config
from supervisor.control import (
    Client,
    RequestFailed,
    locate_config,
    locate_daemon,
    locate_socket,
)
from supervisor.control_server import EVENT_QUEUE, ControlServer
from supervisor.control_socket import open_control_socket
from supervisor.daemon import Daemon
from supervisor.errors import ConfigError, ControlError, DaemonNotRunning
from supervisor.model import LogEvent, ProjectState, Stream
from supervisor.protocol import (
    ActionReply,
    EndReply,
    ErrorReply,
    EventReply,
    EventsRequest,
    FrameReader,
    HistoryReply,
    HistoryRequest,
    LogLinesReply,
    LogsRequest,
    Message,
    ShutdownRequest,
    SkippedReply,
    StatusReply,
    StatusRequest,
    TriggerRequest,
    encode_frame,
)

from .daemon_harness import Harness, data_header, running_daemon
from .helpers import marked_pids, write_script

MANUAL_PROJECT = """
[projects.hello]
path = "{folder}"
trigger = "manual"
"""


def hello_config(tmp_path: Path) -> str:
    write_script(tmp_path / "hello", 'for i in 1 2 3; do echo "line $i"; done')
    return MANUAL_PROJECT.format(folder=tmp_path / "hello")


def socket_of(harness: Harness) -> Path:
    return Path(harness.daemon.config.runvisor.socket)


async def request(path: Path, message: object) -> Message:
    def call() -> Message:
        with Client.connect(path) as client:
            return client.request(message)  # type: ignore[arg-type]

    return await trio.to_thread.run_sync(call)


class RawConnection:
    """A trio connection that speaks frames directly, to send broken ones."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader()

    async def send(self, message: object) -> None:
        await self.stream.send_all(encode_frame(message))  # type: ignore[arg-type]

    async def receive(self) -> Message | None:
        while True:
            message = self.reader.next_message()
            if message is not None:
                return message
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.reader.feed(data)


@asynccontextmanager
async def raw_connection(path: Path) -> AsyncIterator[RawConnection]:
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        yield RawConnection(stream)


# The listening socket


async def test_socket_and_folder_are_private(tmp_path: Path) -> None:
    config = data_header(tmp_path).replace(
        str(tmp_path / "control.sock"), str(tmp_path / "run" / "sub" / "control.sock")
    )
    (tmp_path / "runvisor.toml").write_text(config)
    daemon = Daemon(tmp_path / "runvisor.toml")
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        path = tmp_path / "run" / "sub" / "control.sock"
        socket_mode = os.lstat(path).st_mode
        folder_mode = os.stat(path.parent).st_mode
        daemon.request_shutdown()
    assert stat.S_ISSOCK(socket_mode)
    assert stat.S_IMODE(socket_mode) == 0o600
    assert stat.S_IMODE(folder_mode) == 0o700
    assert not path.exists()


def test_folder_open_to_others_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(ControlError, match="has mode 0755"):
        open_control_socket(folder / "control.sock")
    assert not (folder / "control.sock").exists()


def test_stale_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(os.fspath(path))
    leftover.close()  # the file stays, as after a crash
    control = open_control_socket(path)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(os.fspath(path))
        probe.close()
    finally:
        control.close()
    assert not path.exists()


def test_live_socket_without_lock_is_not_replaced(tmp_path: Path) -> None:
    # Something already answers on the path (another daemon, or any other
    # program): the new daemon must neither delete nor steal it.
    path = tmp_path / "control.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.fspath(path))
    other.listen(1)
    try:
        with pytest.raises(ControlError, match=rf"pid {os.getpid()}\) is already"):
            open_control_socket(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


def test_symlink_at_socket_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    path = tmp_path / "control.sock"
    path.symlink_to(target)
    with pytest.raises(ControlError, match="is a symbolic link"):
        open_control_socket(path)
    assert path.is_symlink()
    assert target.read_text() == "keep me\n"


def test_symlink_to_stale_socket_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(os.fspath(elsewhere))
    leftover.close()
    path = tmp_path / "control.sock"
    path.symlink_to(elsewhere)
    with pytest.raises(ControlError, match="is a symbolic link"):
        open_control_socket(path)
    assert stat.S_ISSOCK(os.lstat(elsewhere).st_mode)


def test_regular_file_at_socket_path_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("notes\n")
    with pytest.raises(ControlError, match="is not a socket"):
        open_control_socket(path)
    assert path.read_text() == "notes\n"


def test_too_long_socket_path_is_explained(tmp_path: Path) -> None:
    folder = tmp_path / ("x" * 100)
    folder.mkdir(mode=0o700)
    with pytest.raises(ControlError, match="shorter path"):
        open_control_socket(folder / "control.sock")


async def test_second_daemon_is_rejected_before_touching_runs(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path / "app", "exec -a t0-ctl-app sleep 1000")
    config = f"""
    [projects.app]
    path = "{tmp_path / "app"}"
    trigger = "always_running"
    start_seconds = 0
    """
    async with running_daemon(tmp_path, config) as harness:
        await harness.wait_for(lambda: harness.pid("app") is not None)
        await harness.wait_for(lambda: bool(marked_pids("t0-ctl-app")))
        first_pid = harness.pid("app")
        second = Daemon(harness.config_path)
        with pytest.raises(ControlError, match="already running"):
            await second.serve()
        assert harness.pid("app") == first_pid
        assert marked_pids("t0-ctl-app") != []
        reply = await request(socket_of(harness), StatusRequest(name="app"))
        assert isinstance(reply, StatusReply)
        assert reply.projects[0].pid == first_pid
        assert reply.daemon.pid == os.getpid()


# Requests


async def test_status_and_trigger_over_socket(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        path = socket_of(harness)
        reply = await request(path, TriggerRequest(name="hello"))
        assert isinstance(reply, ActionReply)
        assert reply.outcome == "started"
        assert reply.run_id is not None
        await harness.wait_runs("hello", 1)
        status = await request(path, StatusRequest())
        history = await request(path, HistoryRequest(name="hello"))
    assert isinstance(status, StatusReply)
    assert [project.name for project in status.projects] == ["hello"]
    assert status.projects[0].state == ProjectState.EXITED
    assert status.projects[0].last_run is not None
    assert status.projects[0].last_run.id == reply.run_id
    assert isinstance(history, HistoryReply)
    assert [run.id for run in history.runs] == [reply.run_id]


async def test_unknown_project_is_an_error_reply(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        with pytest.raises(RequestFailed, match="'nope' is not in the config") as info:
            await request(socket_of(harness), TriggerRequest(name="nope"))
    assert info.value.kind == "unknown_project"


async def test_logs_of_finished_run(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        path = socket_of(harness)
        await request(path, TriggerRequest(name="hello"))
        await harness.wait_runs("hello", 1)

        def read_logs() -> list[Message]:
            with Client.connect(path) as client:
                return list(client.stream(LogsRequest(name="hello", tail=2)))

        messages = await trio.to_thread.run_sync(read_logs)
    assert isinstance(messages[-1], EndReply)
    lines = [
        line.text
        for message in messages
        if isinstance(message, LogLinesReply)
        for line in message.lines
    ]
    assert lines == ["line 2", "line 3"]


async def test_client_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="runvisor serve"):
        Client.connect(tmp_path / "control.sock")


# Broken clients never harm the daemon


async def test_oversized_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        path = socket_of(harness)
        async with raw_connection(path) as raw:
            await raw.stream.send_all(struct.pack(">I", 64 * 1024 * 1024) + b"x" * 10)
            reply = await raw.receive()
            end = await raw.receive()
        still_served = await request(path, StatusRequest())
    assert isinstance(reply, ErrorReply)
    assert reply.kind == "bad_request"
    assert "longer than the maximum frame size" in reply.message
    assert end is None
    assert isinstance(still_served, StatusReply)


async def test_truncated_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        path = socket_of(harness)
        async with raw_connection(path) as raw:
            frame = encode_frame(StatusRequest(id=1))
            await raw.stream.send_all(frame[:-1])
            await raw.stream.send_eof()
            reply = await raw.receive()
        still_served = await request(path, StatusRequest())
    assert isinstance(reply, ErrorReply)
    assert "middle of a frame" in reply.message
    assert isinstance(still_served, StatusReply)


async def test_garbage_and_unknown_types_are_rejected(tmp_path: Path) -> None:
    payloads = [
        b"\xc1\xc1\xc1",
        msgspec.msgpack.encode({"type": "teleport", "id": 9}),
        msgspec.msgpack.encode({"type": "status_reply", "id": 9}),
        msgspec.msgpack.encode([1, 2, 3]),
    ]
    replies = []
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        path = socket_of(harness)
        for payload in payloads:
            async with raw_connection(path) as raw:
                await raw.stream.send_all(struct.pack(">I", len(payload)) + payload)
                replies.append(await raw.receive())
                assert await raw.receive() is None
        still_served = await request(path, StatusRequest())
    assert all(isinstance(reply, ErrorReply) for reply in replies)
    messages = [reply.message for reply in replies if isinstance(reply, ErrorReply)]
    assert "not valid MessagePack" in messages[0]
    assert "Unknown message type 'teleport'" in messages[1]
    assert "Invalid message" in messages[2]
    assert "Invalid message" in messages[3]
    assert isinstance(still_served, StatusReply)


async def test_reply_sent_as_request_is_rejected(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path, hello_config(tmp_path)) as harness,
        raw_connection(socket_of(harness)) as raw,
    ):
        await raw.send(EndReply(id=4))
        reply = await raw.receive()
    assert isinstance(reply, ErrorReply)
    assert reply.id == 4
    assert "Expected a request" in reply.message


async def test_other_user_is_rejected(tmp_path: Path) -> None:
    # Another user cannot even reach a 0600 socket in a 0700 folder, so the
    # server is told that this test's own user id is not allowed.
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        control = open_control_socket(tmp_path / "strict.sock")
        server = ControlServer(harness.daemon, allowed_uid=os.getuid() + 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, control)
            with pytest.raises(RequestFailed, match="Permission denied") as info:
                await request(tmp_path / "strict.sock", StatusRequest())
            nursery.cancel_scope.cancel()
        control.close()
    assert info.value.kind == "permission_denied"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_client_rejects_socket_of_another_user() -> None:
    # The test's temporary folder is private to root, so the planted socket
    # lives in a folder of its own under /tmp, owned by user "nobody".
    base = Path(tempfile.mkdtemp(prefix="rv-foreign-"))
    try:
        base.chmod(0o755)
        os.chown(base, 65534, 65534)
        path = base / "control.sock"
        script = textwrap.dedent(
            f"""
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind({os.fspath(path)!r})
            s.listen(4)
            print("ready", flush=True)
            conn, _ = s.accept()
            conn.recv(100)
            """
        )
        planted = subprocess.Popen(
            ["/usr/bin/python3", "-c", script],
            user=65534,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert planted.stdout is not None
            assert planted.stdout.readline() == "ready\n"
            with pytest.raises(ControlError, match="served by user id 65534"):
                Client.connect(path)
        finally:
            planted.kill()
            planted.wait()
            planted.stdout.close()  # type: ignore[union-attr]
    finally:
        shutil.rmtree(base)


# Live subscribers


async def test_slow_subscriber_skips_and_is_told(tmp_path: Path) -> None:
    published = EVENT_QUEUE * 40
    async with (
        running_daemon(tmp_path, hello_config(tmp_path)) as harness,
        raw_connection(socket_of(harness)) as raw,
    ):
        await raw.send(EventsRequest(id=1, projects=["hello"]))
        ack = await raw.receive()
        assert isinstance(ack, ActionReply)

        # The client reads nothing while every event is published, and
        # publishing never waits for it.
        at = datetime.now(UTC)
        for number in range(published):
            harness.daemon.hub.publish(
                LogEvent(
                    project="hello",
                    run_id=1,
                    stream=Stream.OUT,
                    text=f"line {number} " + "x" * 100,
                    at=at,
                )
            )
            if number % 100 == 0:
                await trio.lowlevel.checkpoint()

        received: list[int] = []
        skipped = 0
        while len(received) + skipped < published:
            message = await raw.receive()
            if isinstance(message, SkippedReply):
                skipped += message.count
            else:
                assert isinstance(message, EventReply)
                assert isinstance(message.event, LogEvent)
                received.append(int(message.event.text.split()[1]))
    assert skipped > 0
    assert len(received) + skipped == published
    assert received == sorted(received)
    assert received[0] == 0


async def test_closed_subscriber_is_dropped(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, hello_config(tmp_path)) as harness:
        hub = harness.daemon.hub
        subscribers_before = len(hub._subscriptions)
        async with raw_connection(socket_of(harness)) as raw:
            await raw.send(EventsRequest(id=1))
            assert isinstance(await raw.receive(), ActionReply)
            assert len(hub._subscriptions) == subscribers_before + 1
        with trio.fail_after(5):
            while len(hub._subscriptions) != subscribers_before:
                await trio.sleep(0.01)


async def test_shutdown_reply_then_close(tmp_path: Path, fast_clock: MockClock) -> None:
    write_script(tmp_path / "app", "exec -a t0-ctl-down sleep 1000")
    config = f"""
    [projects.app]
    path = "{tmp_path / "app"}"
    trigger = "always_running"
    start_seconds = 0
    """
    async with running_daemon(tmp_path, config) as harness:
        await harness.wait_for(lambda: bool(marked_pids("t0-ctl-down")))
        async with raw_connection(socket_of(harness)) as raw:
            await raw.send(ShutdownRequest(id=3))
            ack = await raw.receive()
            closed = await raw.receive()
            left = marked_pids("t0-ctl-down")
    assert isinstance(ack, ActionReply)
    assert ack.id == 3
    assert closed is None
    assert left == []


# Finding the socket without the config loader


@pytest.mark.parametrize(
    "runvisor_table",
    [
        'data_dir = "data"\nsocket = "run/control.sock"\n',
        'data_dir = "data"\n',
        'data_dir = "~/rv-data"\n',
        'socket = "/tmp/x/control.sock"\ndata_dir = "/srv/rv"\n',
        "",
    ],
)
@pytest.mark.parametrize("runtime_dir", [None, "/run/user/4321"])
def test_locate_socket_matches_loader(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runvisor_table: str,
    runtime_dir: str | None,
) -> None:
    if runtime_dir is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    path = tmp_path / "runvisor.toml"
    path.write_text(f"[runvisor]\n{runvisor_table}\n[projects]\n")
    assert locate_socket(path) == Path(load_config(path).runvisor.socket)


BROKEN_PROJECT = '[projects.x]\npath = "x"\ntrigger = "manual\n'


@pytest.mark.parametrize(
    "daemon_settings",
    [
        '[runvisor]\ndata_dir = "data"  # kept\nsocket = "run/control.sock"\n',
        "[runvisor]\ndata_dir = 'data'\n[projects.y]\npath = 'y'\n"
        "trigger = 'manual'\n[projects.y.env]\nsocket = 'other.sock'\n",
        '[ runvisor ]\nsocket = "/tmp/x/control.sock"\ndata_dir = "~/rv"\n',
        'runvisor.socket = "top.sock"\nrunvisor . data_dir = "d"\n[credentials]\n',
        "[credentials]\n",
    ],
)
def test_locate_daemon_reads_a_broken_file_by_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemon_settings: str
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    path = tmp_path / "runvisor.toml"
    path.write_text(daemon_settings + BROKEN_PROJECT.replace("manual", 'manual"'))
    config = load_config(path)
    path.write_text(daemon_settings + BROKEN_PROJECT)
    with pytest.raises(ConfigError):
        load_config(path)
    assert locate_daemon(path) == (
        Path(config.runvisor.socket),
        Path(config.runvisor.data_dir),
    )


@pytest.mark.parametrize(
    ("daemon_settings", "line"),
    [
        ('[runvisor]\nsocket = "run/control.sock\n', 2),
        ('[runvisor]\nsocket = "a.sock"\nsocket = "b.sock"\n', 3),
        ("[runvisor]\ndata_dir = [\n", 3),
    ],
)
def test_locate_daemon_rejects_an_unreadable_socket_line(
    tmp_path: Path, daemon_settings: str, line: int
) -> None:
    path = tmp_path / "runvisor.toml"
    path.write_text(daemon_settings + BROKEN_PROJECT)
    with pytest.raises(ConfigError, match=f"{path}:{line}: invalid TOML"):
        locate_daemon(path)


def test_locate_daemon_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "runvisor.toml"
    with pytest.raises(ConfigError, match="config file not found"):
        locate_daemon(path)


@pytest.mark.parametrize("cli_value", [None, "other.toml", "~/x.toml"])
@pytest.mark.parametrize("environment", [None, "env.toml"])
@pytest.mark.parametrize("local_file", [False, True])
def test_locate_config_matches_loader(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli_value: str | None,
    environment: str | None,
    local_file: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    if environment is None:
        monkeypatch.delenv("RUNVISOR_CONFIG", raising=False)
    else:
        monkeypatch.setenv("RUNVISOR_CONFIG", environment)
    if local_file:
        (tmp_path / "runvisor.toml").write_text("")
    assert locate_config(cli_value) == find_config_path(cli_value)
