"""A real `runvisor serve` in a child process, and the CLI run against it.

For end-to-end tests of the CLI and the shell, in real time: the daemon is
started as `python -m supervisor --config PATH serve` and found through its
control socket, exactly as a user's commands would find it.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import IO

from supervisor.control import Client
from supervisor.errors import DaemonNotRunning
from supervisor.protocol import StatusRequest

from .helpers import runvisor_argv

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


class DaemonProcess:
    """A config in a temporary folder and the daemon that runs it."""

    def __init__(self, root: Path, projects: str) -> None:
        self.root = root
        self.socket = root / "control.sock"
        self.data_dir = root / "data"
        self.config = root / "runvisor.toml"
        self.log = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config(projects)

    def write_config(self, projects: str) -> None:
        header = (
            "# daemon settings for the test\n"
            f'[runvisor]\ndata_dir = "{self.data_dir}"  # runs and logs\n'
            f'socket = "{self.socket}"\n'
        )
        self.config.write_text(header + textwrap.dedent(projects))
        # Private, as the README requires of a config with secrets in it.
        self.config.chmod(0o600)

    def start(self) -> DaemonProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*runvisor_argv(), "--config", str(self.config), "serve"],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # Ready once it replies to a request. The socket accepts
            # connections while the daemon is still starting up.
            try:
                with Client.connect(self.socket) as client:
                    client.request(StatusRequest())
                return self
            except DaemonNotRunning:
                pass
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.process.returncode}:\n"
                    + self.log.read_text()
                )
            if time.monotonic() > deadline:
                raise AssertionError("the daemon did not answer on its socket")
            time.sleep(0.02)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Stop the daemon if it still runs (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run one CLI command in its own process, output captured."""
        return subprocess.run(
            [*runvisor_argv(), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env={**os.environ, **(env or {})},
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a CLI command that keeps running (logs -f, events)."""
        return subprocess.Popen(
            [*runvisor_argv(), "--config", str(self.config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
        )


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll `condition` in real time until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class LineReader:
    """Lines of a child's pipe, read by a thread, so a test can wait for
    the next one with a timeout instead of hanging."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")  # the end of the output

    def next(self, timeout: float = 10.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None
        if not line:
            raise AssertionError("the command closed its output")
        return line

    def ready(self, timeout: float) -> bool:
        """Wait until a line is waiting, for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._lines.empty():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Close the pipe once the thread has read it to the end. Call it
        after the child exited."""
        self._thread.join(5)
        self._stream.close()
