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
import socket
import struct
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from supervisor.errors import ControlError, DaemonNotRunning, ProtocolError
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
    """Return the config file to use, by the rules of
    `config.find_config_path`, without importing the config loader."""
    for chosen in (cli_value, os.environ.get("RUNVISOR_CONFIG")):
        if chosen:
            return Path(os.path.abspath(os.path.expanduser(chosen)))
    local = Path("runvisor.toml")
    if local.is_file():
        return local.absolute()
    import platformdirs

    return Path(platformdirs.user_config_dir("runvisor")) / "runvisor.toml"


def locate_socket(config_path: Path) -> Path:
    """Return the control socket path that the config at `config_path` sets.

    Reads only the `[runvisor]` table, with the loader's rules: a relative
    path resolves against the config file's folder, and without `socket` the
    default is `$XDG_RUNTIME_DIR/runvisor/control.sock`, else
    `control.sock` in the data dir. A missing, unreadable or invalid file
    gives the default, so a client can still reach a daemon whose file was
    broken after it started.
    """
    folder = config_path.parent
    settings: dict[str, object] = {}
    try:
        with open(config_path, "rb") as file:
            table = tomllib.load(file).get("runvisor", {})
        if isinstance(table, dict):
            settings = table
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass

    configured = settings.get("socket")
    if isinstance(configured, str) and configured:
        return _resolve(folder, configured)
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir, "runvisor", "control.sock")
    data_dir = settings.get("data_dir")
    if not (isinstance(data_dir, str) and data_dir):
        import platformdirs

        data_dir = platformdirs.user_data_dir("runvisor")
    return _resolve(folder, data_dir) / "control.sock"


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
            ControlError: the socket cannot be used (permission denied, or it
                is served by another user).
        """
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
