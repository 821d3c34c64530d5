"""The client side of the control socket, and where that socket is.

Every CLI command that talks to the daemon goes through `Client`, a plain
blocking socket: one request, then one reply or a stream of pushed messages.
This module imports only the standard library, msgspec and the protocol,
because `runvisor status` must start fast. The server is in
`control_server`.

The client trusts nothing but the socket file: it checks that the process
serving it runs as the same user (SO_PEERCRED), so a socket planted by
someone else never receives a request.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import struct
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from supervisor.errors import (
    ConfigError,
    ControlError,
    DaemonNotRunning,
    ProtocolError,
)
from supervisor.paths import find_config_path
from supervisor.protocol import (
    EndReply,
    ErrorKind,
    ErrorReply,
    FrameReader,
    Message,
    Request,
    encode_frame,
)

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the daemon to accept a connection."""

REPLY_TIMEOUT = 30.0
"""Default seconds to wait for a reply to a quick request."""

MAX_SOCKET_PATH_BYTES = 107
"""Linux keeps a Unix socket path in sun_path: 108 bytes with the final NUL."""

_RECEIVE_BYTES = 256 * 1024
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RequestFailed(ControlError):
    """The daemon replied to a request with an error.

    `kind` is one of the `protocol.ErrorKind` values.
    """

    def __init__(self, message: str, kind: str = ErrorKind.FAILED) -> None:
        self.kind = kind
        super().__init__(message)


class Interrupted(Exception):
    """The client was interrupted (`Client.interrupt`) while it waited."""


def locate_config(cli_value: str | None) -> Path:
    """Return the config file to use, by `paths.find_config_path`."""
    return find_config_path(cli_value)


class DaemonPaths(NamedTuple):
    """The control socket and the data dir of the daemon of a config."""

    socket: Path
    data_dir: Path


def locate_daemon(config_path: Path) -> DaemonPaths:
    """Return the control socket and the data dir that the config at
    `config_path` sets, with the loader's rules.

    Reads only the `[runvisor]` table: a relative path resolves against the
    config file's folder, the data dir defaults to the user data dir, and
    the socket defaults to `$XDG_RUNTIME_DIR/runvisor/control.sock`, else
    `control.sock` in the data dir. A file that is not valid TOML as a
    whole is read line by line, so a client still reaches a daemon whose
    file was broken after it started, and can ask it to reload.

    Raises:
        ConfigError: the file cannot be read, or it is not valid TOML and
            its `socket` or `data_dir` line cannot be read on its own. The
            message is the loader's, with file and line.
    """
    try:
        data = config_path.read_bytes()
    except OSError:
        raise _unreadable_config(config_path) from None
    settings: dict[str, object] | None
    try:
        table = tomllib.loads(data.decode("utf-8")).get("runvisor", {})
        settings = table if isinstance(table, dict) else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        settings = _scan_daemon_table(data.decode("utf-8", errors="replace"))
    if settings is None:
        raise _unreadable_config(config_path)

    folder = config_path.parent
    data_dir = settings.get("data_dir")
    if not (isinstance(data_dir, str) and data_dir):
        import platformdirs

        data_dir = platformdirs.user_data_dir("runvisor")
    data_path = _resolve(folder, data_dir)
    configured = settings.get("socket")
    if isinstance(configured, str) and configured:
        socket_path = _resolve(folder, configured)
    elif runtime_dir := os.environ.get("XDG_RUNTIME_DIR"):
        socket_path = Path(runtime_dir, "runvisor", "control.sock")
    else:
        socket_path = data_path / "control.sock"
    return DaemonPaths(socket=socket_path, data_dir=data_path)


def locate_socket(config_path: Path) -> Path:
    """Return the control socket path that the config at `config_path` sets,
    as `locate_daemon` finds it.

    Raises:
        ConfigError: as `locate_daemon`.
    """
    return locate_daemon(config_path).socket


# A table header such as [runvisor] or [[projects.x.items]], and the keys
# of the daemon's paths, inside [runvisor] or dotted at the top level.
_TABLE_HEADER = re.compile(r"\s*\[\s*(?P<name>[^\[\]#]*?)\s*\]\s*(#.*)?$")
_DAEMON_KEY = re.compile(r"\s*(socket|data_dir)\s*=")
_DOTTED_DAEMON_KEY = re.compile(r"\s*runvisor\s*\.\s*(socket|data_dir)\s*=")


def _scan_daemon_table(text: str) -> dict[str, object] | None:
    """Read `socket` and `data_dir` of the `[runvisor]` table line by line,
    from a file that is not valid TOML as a whole. Return None when one of
    those lines is not valid TOML on its own, or appears twice.

    NOTE: a `[runvisor]` line inside a multi-line string is taken for a
    header, and an inline `runvisor = { ... }` table is not read.
    """
    settings: dict[str, object] = {}
    table: str | None = ""  # "" is the top level, None any other table
    for line in text.splitlines():
        header = _TABLE_HEADER.match(line)
        if header is not None or line.lstrip().startswith("["):
            name = header["name"] if header is not None else None
            table = "runvisor" if name == "runvisor" else None
            continue
        if table == "runvisor":
            key = _DAEMON_KEY.match(line)
        elif table == "":
            key = _DOTTED_DAEMON_KEY.match(line)
        else:
            key = None
        if key is None:
            continue
        try:
            parsed: dict[str, Any] = tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            return None
        value = parsed["runvisor"] if table == "" else parsed
        if key[1] in settings:
            return None
        settings[key[1]] = value[key[1]]
    return settings


def _unreadable_config(config_path: Path) -> ConfigError:
    """Return the loader's error for a config file whose daemon paths
    cannot be read."""
    from supervisor.config import load_config

    problems = [f"{config_path}: the [runvisor] socket setting cannot be read."]
    try:
        load_config(config_path)
    except ConfigError as error:
        problems = error.problems
    return ConfigError(
        [
            *problems,
            "The control socket's path is read from this file, so fix the file first.",
        ]
    )


def _resolve(folder: Path, path: str) -> Path:
    return Path(os.path.normpath(folder / os.path.expanduser(path)))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """Return (pid, uid, gid) of the process at the other end of a Unix
    socket, as the kernel recorded them when the connection was made."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(data)
    return pid, uid, gid


def _connect_within(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect, retrying while the daemon's listen backlog is full.

    A Unix socket with a timeout is non-blocking inside, and such a connect
    to a full backlog fails at once with EAGAIN instead of waiting, so it is
    retried until `timeout`. Raises TimeoutError after that.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(os.fspath(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)


def no_daemon_message(path: Path | str) -> str:
    return (
        f"No runvisor daemon is listening on {path}. Start one with "
        "'runvisor serve' (or 'runvisor up' for the daemon with a shell), "
        "using the same config."
    )


class Client:
    """A blocking connection to the daemon. Create it with `connect`.

    One thread uses it at a time, except `interrupt`, which any thread may
    call to end a wait (for example on Ctrl-C in the shell).
    """

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.path = path
        self.daemon_pid, _, _ = peer_credentials(sock)
        self._sock = sock
        self._reader = FrameReader()
        self._ids = itertools.count(1)
        self._interrupted = threading.Event()

    @classmethod
    def connect(cls, path: Path, timeout: float = CONNECT_TIMEOUT) -> Client:
        """Connect to the daemon listening on `path`.

        Raises:
            DaemonNotRunning: nothing listens on `path`.
            ControlError: the socket cannot be used (permission denied, a
                path too long for a Unix socket, or it is served by another
                user).
        """
        length = len(os.fsencode(path))
        if length > MAX_SOCKET_PATH_BYTES:
            raise ControlError(
                f"The control socket path {path} is {length} bytes long, but a "
                f"Unix socket path has at most {MAX_SOCKET_PATH_BYTES} bytes. Set "
                "[runvisor] socket to a shorter path."
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            _connect_within(sock, path, timeout)
            _, uid, _ = peer_credentials(sock)
            if uid != os.getuid():
                raise ControlError(
                    f"The control socket {path} is served by user id {uid}, not "
                    f"by you (user id {os.getuid()}), so runvisor does not use "
                    "it. Check the 'socket' setting and who owns its folder."
                )
            return cls(sock, path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonNotRunning(no_daemon_message(path)) from None
        except PermissionError:
            sock.close()
            raise ControlError(
                f"Permission denied on the control socket {path}. Run the "
                "command as the user who runs the daemon."
            ) from None
        except TimeoutError:
            sock.close()
            raise ControlError(
                f"The daemon on {path} did not accept the connection within "
                f"{timeout:g} seconds. It may be overloaded or stuck."
            ) from None
        except OSError as error:
            sock.close()
            raise ControlError(
                f"Cannot connect to the control socket {path}: "
                f"{error.strerror or error}. Check the [runvisor] socket setting."
            ) from None
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def interrupt(self) -> None:
        """End the current or next wait with `Interrupted`. Thread-safe."""
        self._interrupted.set()
        # OSError: the socket is already closed.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def send(self, request: Request) -> int:
        """Send a request and return the id it was given."""
        request.id = next(self._ids)
        try:
            self._sock.sendall(encode_frame(request))
        except OSError as error:
            self._check_interrupted()
            # The daemon may have rejected the connection before reading
            # the request: its error reply is then already waiting.
            try:
                reply = self.receive(timeout=1.0)
            except ControlError:
                reply = None
            if reply is not None:
                _raise_error(reply)
            raise ControlError(
                f"Cannot send a request to the daemon on {self.path}: {error}."
            ) from None
        return request.id

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait for the next message; return None when the daemon closed
        the connection cleanly.

        Raises:
            Interrupted: `interrupt` was called.
            ControlError: timeout, broken connection or malformed frame.
        """
        self._sock.settimeout(timeout)
        while True:
            message = self._reader.next_message()
            if message is not None:
                return message
            try:
                data = self._sock.recv(_RECEIVE_BYTES)
            except TimeoutError:
                raise ControlError(
                    f"The daemon on {self.path} did not reply within "
                    f"{timeout:g} seconds."
                ) from None
            except OSError as error:
                self._check_interrupted()
                raise ControlError(
                    f"The connection to the daemon on {self.path} broke: {error}."
                ) from None
            if not data:
                self._check_interrupted()
                try:
                    self._reader.check_complete()
                except ProtocolError as error:
                    raise ControlError(
                        f"{error} The daemon may have crashed."
                    ) from None
                return None
            self._reader.feed(data)

    def request(
        self, request: Request, timeout: float | None = REPLY_TIMEOUT
    ) -> Message:
        """Send a request and return its reply.

        Raises:
            RequestFailed: the daemon replied with an error.
            ControlError: the daemon closed the connection without a reply.
        """
        self.send(request)
        reply = self.receive(timeout)
        if reply is None:
            raise ControlError(
                f"The daemon on {self.path} closed the connection without a "
                "reply. It may be shutting down; see its log."
            )
        return _raise_error(reply)

    def stream(self, request: Request) -> Iterator[Message]:
        """Send a request and yield the messages of its stream, without a
        timeout, up to and including `EndReply`, or up to the end of the
        connection.

        Raises:
            RequestFailed: the daemon replied with an error.
        """
        self.send(request)
        while True:
            message = self.receive(None)
            if message is None:
                return
            yield _raise_error(message)
            if isinstance(message, EndReply):
                return

    def _check_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise Interrupted()


def _raise_error(message: Message) -> Message:
    if isinstance(message, ErrorReply):
        raise RequestFailed(message.message, message.kind)
    return message
