"""Process facts read from /proc, bounded waits, and the sweep of leftovers.

Every process a benchmark run starts carries its run marker: either in its
argv (the temporary folder's path, or an `exec -a rvbench-<id>-...` name) or
in its environment (`RVBENCH_RUN=<id>`, inherited by every descendant that
keeps its environment). The sweep ends only processes that carry the marker,
one pid at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MARKER_ENV = "RVBENCH_RUN"

T = TypeVar("T")


class BenchTimeout(Exception):
    """A bounded wait of the benchmark ran out of time."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> T:
    """Call `predicate` until it returns a value that is not None or false.

    Raises BenchTimeout naming `what` when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchTimeout(f"Timed out after {timeout:.1f} s waiting for {what}.")
        time.sleep(interval)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        # A process that exits while being read gives ESRCH on some files.
        return None


def is_alive(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return False
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds of `pid` itself (children excluded)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of proc(5), counted from 1 with pid and comm first.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: bytes) -> int:
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return 0
    for line in status.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_mib(pids: Iterable[int]) -> float:
    """Return the summed resident set size (VmRSS) of `pids` in MiB."""
    return sum(_status_kib(pid, b"VmRSS:") for pid in pids) / 1024


def peak_rss_mib(pids: Iterable[int]) -> float:
    """Return the summed lifetime peak resident set size (VmHWM) in MiB."""
    return sum(_status_kib(pid, b"VmHWM:") for pid in pids) / 1024


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def cmdline(pid: int) -> bytes:
    return _read(f"/proc/{pid}/cmdline") or b""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def carries_marker(pid: int, marker: str) -> bool:
    """Return whether `pid` carries `marker` in its argv or environment."""
    needle = marker.encode()
    if needle in cmdline(pid):
        return True
    environ = _read(f"/proc/{pid}/environ") or b""
    return f"{MARKER_ENV}={marker}".encode() in environ.split(b"\0")


def marked_pids(marker: str, argv_contains: str | None = None) -> list[int]:
    """Return live pids that carry `marker`, optionally filtered by argv text.

    The benchmark's own process is never listed.
    """
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me or not carries_marker(pid, marker):
            continue
        if argv_contains is not None and argv_contains.encode() not in cmdline(pid):
            continue
        if is_alive(pid):
            found.append(pid)
    return found


def kill_pid(pid: int, marker: str, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `pid` if it still carries `marker` (a reused pid is left alone)."""
    if not carries_marker(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def sweep(marker: str, rounds: int = 5) -> int:
    """Kill every live process that carries `marker`, by pid.

    Returns how many were alive at the first look. Repeats a few rounds,
    because a dying parent can still fork between two looks.
    """
    first = len(marked_pids(marker))
    for _ in range(rounds):
        pids = marked_pids(marker)
        if not pids:
            break
        for pid in pids:
            kill_pid(pid, marker)
        time.sleep(0.1)
    return first


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_command(
    argv: list[str],
    env: dict[str, str],
    timeout: float,
    cwd: Path | None = None,
    check: bool = True,
) -> CommandResult:
    """Run a CLI command, bounded by `timeout`, and return its output and wall time.

    Raises RuntimeError when `check` is set and the command exits non-zero.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BenchTimeout(
            f"Timed out after {timeout:.1f} s running {' '.join(argv)}."
        ) from None
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"Command {' '.join(argv)} exited with {proc.returncode}: "
            f"{err.strip() or out.strip()}"
        )
    return CommandResult(argv, proc.returncode, out, err, seconds)


def stop_popen(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """End a process this run started: SIGTERM, wait `timeout`, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
