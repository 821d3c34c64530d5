"""Tools shared by the fault tests (`test_faults_*.py`).

The fault tests run `runvisor serve` as a real process where a real process
matters: kill -9, memory, file descriptor limits, users. They read what it
leaves behind: the database, the log files, and the processes that carry
the run markers in their environment.

Counts are small by default so that the suite fits in CI. Each count has an
environment variable for the full run, listed in RELIABILITY.md.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from supervisor.control import Client
from supervisor.protocol import StatusReply, StatusRequest

T = TypeVar("T")

# The maximum wait for a `status` reply that the fault tests accept.
STATUS_LIMIT_SECONDS = 1.0

REPOSITORY = Path(__file__).resolve().parent.parent

# Every process of a daemon started by these tests inherits this variable
# with a value unique to the daemon, so the tests find the processes of their
# own runs and no one else's.
FAULT_TAG_VARIABLE = "RUNVISOR_FAULT_TAG"

READY_LINE = "supervisor.daemon: running: config="


def fault_count(variable: str, default: int) -> int:
    """Read a count from the environment (full runs), else the CI default."""
    text = os.environ.get(variable)
    return int(text) if text else default


def fault_random(test_name: str) -> random.Random:
    """A random generator seeded from RUNVISOR_FAULT_SEED, or a fresh seed.

    The seed is printed, so a failing run can be replayed with
    RUNVISOR_FAULT_SEED=<seed>.
    """
    seed = int(os.environ.get("RUNVISOR_FAULT_SEED") or random.randrange(2**32))
    print(f"{test_name}: RUNVISOR_FAULT_SEED={seed}")
    return random.Random(seed)


def wait_until(
    condition: Callable[[], T], timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Poll `condition` in real time until it returns a true value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def write_config(
    root: Path, projects: str, *, data_dir: Path | None = None, settings: str = ""
) -> Path:
    """Write a config whose data dir and control socket are under `root`;
    `settings` adds lines to the [runvisor] table."""
    data = data_dir if data_dir is not None else root / "data"
    # The daemon accepts a control socket only in a folder of mode 0700.
    socket_dir = root / "control"
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / "runvisor.toml"
    path.write_text(
        f'[runvisor]\ndata_dir = "{data}"\nsocket = "{socket_dir / "control.sock"}"\n'
        + textwrap.dedent(settings)
        + textwrap.dedent(projects)
    )
    return path


def socket_path(config: Path) -> Path:
    return config.parent / "control" / "control.sock"


# -- processes ----------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """Return the state letter of a process (R, S, Z, ...), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def is_alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def read_environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            raw = file.read()
    except OSError:
        return {}
    variables = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            variables[name.decode(errors="replace")] = value.decode(errors="replace")
    return variables


@dataclass(frozen=True)
class RunProcess:
    pid: int
    project: str
    run_id: int


def run_processes(tag: str) -> list[RunProcess]:
    """Live processes of runs of the daemon whose fault tag is `tag`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        environ = read_environ(pid)
        if environ.get(FAULT_TAG_VARIABLE) != tag:
            continue
        run_id = environ.get("RUNVISOR_RUN_ID")
        if run_id is None or not is_alive(pid):
            continue
        found.append(RunProcess(pid, environ.get("RUNVISOR_PROJECT", ""), int(run_id)))
    return found


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever a failed test left of its runs."""
    for process in run_processes(tag):
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the daemon as a real process ---------------------------------------------


@dataclass
class DaemonProcess:
    """`runvisor serve` (or another entry point) as a real child process."""

    config: Path
    log_path: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    argv: Sequence[str] = ()
    preexec_fn: Callable[[], None] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> None:
        argv = list(self.argv) or [
            sys.executable,
            "-m",
            "supervisor",
            "--config",
            str(self.config),
            "serve",
        ]
        env = {**os.environ, FAULT_TAG_VARIABLE: self.tag, **self.extra_env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=self.config.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=self.preexec_fn,
            )
        self.starts += 1
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until this start has logged that it serves (after recovery)."""

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.process.returncode}:\n"
                    + self.log_text()[-3000:]
                )
            return self.log_text().count(READY_LINE) >= self.starts

        wait_until(ready, timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        kill_tagged(self.tag)


@contextmanager
def daemon_process(root: Path, config: Path, **options: Any) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(config=config, log_path=root / "daemon.log", **options)
    try:
        yield daemon
    finally:
        daemon.cleanup()


# -- the database ---------------------------------------------------------------


def query(db_path: Path, sql: str, params: Sequence[object] = ()) -> list[Any]:
    """Run a read-only query on a fresh connection."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def integrity(db_path: Path) -> str:
    return str(query(db_path, "PRAGMA integrity_check")[0][0])


def duplicate_fire_times(db_path: Path) -> list[Any]:
    """(project, fire_time, count) of fire times run more than once."""
    return query(
        db_path,
        "SELECT project, fire_time, count(*) FROM runs"
        " WHERE fire_time IS NOT NULL AND status != 'skipped'"
        " GROUP BY project, fire_time HAVING count(*) > 1",
    )


# -- the control socket -----------------------------------------------------------


@dataclass
class Monitor:
    """A thread that requests status and samples RSS until stopped."""

    socket: Path
    pid: int
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    last: StatusReply | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with Client.connect(
                    self.socket, timeout=STATUS_LIMIT_SECONDS
                ) as client:
                    reply = client.request(
                        StatusRequest(), timeout=STATUS_LIMIT_SECONDS
                    )
                assert isinstance(reply, StatusReply)
                self.last = reply
            except Exception as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            self.latencies.append(time.monotonic() - started)
            try:
                self.rss.append(rss_kib(self.pid))
            except OSError as error:
                self.failures.append(f"cannot read the RSS: {error}")
            self._stop.wait(0.05)

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def check(self) -> None:
        """Assert that every status request got its reply in time."""
        assert self.failures == [], self.failures
        assert max(self.latencies) < STATUS_LIMIT_SECONDS, sorted(self.latencies)[-5:]
