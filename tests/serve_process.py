"""`runvisor serve` as a real process, for end-to-end tests in real time.

The daemon is started with NOTIFY_SOCKET pointing at a datagram socket of
the test, as systemd does for a `Type=notify` unit, so a test waits for
READY=1 instead of polling, and can check every notification it sends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Real time for a daemon to start: the single executable unpacks about 30 MB
# first, which takes seconds on a loaded machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Notification:
    """One datagram sent to NOTIFY_SOCKET, and the pid of its sender."""

    text: str
    pid: int

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


class NotifyListener:
    """A datagram socket that receives sd_notify messages, with the sender's
    pid (SO_PASSCRED).

    Like systemd, it reads every message as it arrives, in a thread, unless
    `reading` is false: then it reads only inside `wait_for`, and a sender
    meets a full queue after about ten unread messages (the kernel's
    net.unix.max_dgram_qlen).
    """

    def __init__(self, path: Path, *, reading: bool = True) -> None:
        self.path = path
        self.received: list[Notification] = []
        self._waited = 0
        self._changed = threading.Condition()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind(str(path))
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        if reading:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def close(self) -> None:
        self._stop_reading()
        self._socket.close()

    def _read(self) -> None:
        while not self._stopping.is_set():
            self._receive(0.05)

    def _stop_reading(self) -> None:
        if self._reader is not None:
            self._stopping.set()
            self._reader.join()
            self._reader = None

    def _receive(self, timeout: float) -> None:
        self._socket.settimeout(timeout)
        try:
            data, ancillary, _, _ = self._socket.recvmsg(
                4096, socket.CMSG_SPACE(struct.calcsize("3i"))
            )
        except TimeoutError:
            return
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("3i", payload)
        with self._changed:
            self.received.append(Notification(data.decode(), pid))
            self._changed.notify_all()

    def wait_for(self, line: str, timeout: float) -> Notification | None:
        """Return the next notification that contains `line`, or None once
        `timeout` seconds have passed.

        Each call starts after the notification that the previous call
        returned.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                for index in range(self._waited, len(self.received)):
                    if line in self.received[index].lines:
                        self._waited = index + 1
                        return self.received[index]
                self._waited = len(self.received)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._reader is not None:
                    self._changed.wait(remaining)
                    continue
            self._receive(remaining)

    def drain(self) -> None:
        """Stop the reading thread, then read what is still queued."""
        self._stop_reading()
        while True:
            count = len(self.received)
            self._receive(0.01)
            if len(self.received) == count:
                return

    def states(self) -> list[str]:
        """Every line received so far, in order."""
        with self._changed:
            return [line for item in self.received for line in item.lines]


class ServeProcess:
    """A `runvisor serve` process in its own session, with its log in a file."""

    def __init__(
        self,
        command: Sequence[str],
        config: Path,
        folder: Path,
        env: Mapping[str, str],
        *,
        read_notifications: bool = True,
    ) -> None:
        self.log_path = folder / "daemon.log"
        self.notify = NotifyListener(folder / "notify.sock", reading=read_notifications)
        environment = {**env, "NOTIFY_SOCKET": str(self.notify.path)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--config", str(config), "serve"],
                cwd=folder,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> Notification:
        """Wait for the first READY=1 and return it."""
        ready = self.notify.wait_for("READY=1", START_TIMEOUT)
        assert ready is not None, (
            f"no READY=1 within {START_TIMEOUT:g} s:\n{self.log()}"
        )
        return ready

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"runvisor still runs {timeout:g} s later:\n{self.log()}"
            ) from None
        self.notify.drain()
        return code

    def close(self) -> None:
        """Stop the daemon if a test left it running, then free the socket."""
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self.notify.close()


@contextlib.contextmanager
def serving(
    command: Sequence[str], config: Path, folder: Path, env: Mapping[str, str]
) -> Iterator[ServeProcess]:
    """Start `runvisor serve`, wait for READY=1, and stop it at the end."""
    daemon = ServeProcess(command, config, folder, env)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.close()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, log: Callable[[], str]
) -> None:
    """Poll `condition` in real time until it holds, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s:\n{log()}")
        time.sleep(0.05)


def config_text(folder: Path, projects: str, credentials: str = "file") -> str:
    """A config whose data dir and control socket are in `folder`."""
    return (
        "[runvisor]\n"
        f'data_dir = "{folder / "data"}"\n'
        f'socket = "{folder / "control.sock"}"\n'
        "[credentials]\n"
        f'backend = "{credentials}"\n' + projects
    )


def fresh_environment(folder: Path) -> dict[str, str]:
    """This process's environment with an empty TMPDIR of the test, so the
    single executable's `_MEI*` folders can be counted, and no D-Bus session
    or config of the user."""
    tmpdir = folder / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)
    for name in ("DBUS_SESSION_BUS_ADDRESS", "RUNVISOR_CONFIG", "NOTIFY_SOCKET"):
        env.pop(name, None)
    return env


def unpacked_folders(env: Mapping[str, str]) -> list[str]:
    """The `_MEI*` folders of single executables in the environment's TMPDIR."""
    return sorted(
        entry.name
        for entry in os.scandir(env["TMPDIR"])
        if entry.name.startswith("_MEI")
    )
