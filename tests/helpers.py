"""Helpers shared by the tests: scripts, marked processes, clocks."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path


def write_script(folder: Path, body: str, name: str = "run.sh") -> Path:
    """Write an executable bash script into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body).strip() + "\n")
    path.chmod(0o755)
    return path


# Every process started by this test session inherits this variable, so the
# tests count only their own processes when several suites run at once.
SESSION_VARIABLE = "RUNVISOR_TEST_SESSION"
SESSION_ID = os.environ.setdefault(SESSION_VARIABLE, uuid.uuid4().hex)
_SESSION_MARKER = f"{SESSION_VARIABLE}={SESSION_ID}".encode()


def marked_pids(prefix: str) -> list[int]:
    """Live pids of this test session whose argv[0] starts with `prefix`
    (set with `exec -a`).

    Zombies are skipped: they have an empty command line.
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                argv0 = file.read().split(b"\0", 1)[0]
            if not argv0.decode(errors="replace").startswith(prefix):
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as file:
                if _SESSION_MARKER not in file.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(int(entry.name))
    return sorted(found)


def wait_until_gone(prefix: str, timeout: float) -> list[int]:
    """Poll (real time, for end-to-end tests) until no marked process is left."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        pids = marked_pids(prefix)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def runvisor_argv() -> list[str]:
    """The command that runs runvisor in end-to-end tests: the single
    executable named by RUNVISOR_BINARY (`make test-frozen` sets it), or the
    source tree with this Python."""
    binary = os.environ.get("RUNVISOR_BINARY")
    if binary:
        return [str(Path(binary).resolve())]
    return [sys.executable, "-m", "supervisor"]


def daemon_pid(launched_pid: int) -> int:
    """The pid of the runvisor daemon started as `launched_pid`.

    The single executable runs as a bootloader whose child is the Python
    process that serves, so with RUNVISOR_BINARY set the daemon is the
    bootloader's only child. From source they are the same process.
    """
    if not os.environ.get("RUNVISOR_BINARY"):
        return launched_pid
    with open(f"/proc/{launched_pid}/task/{launched_pid}/children") as file:
        children = [int(word) for word in file.read().split()]
    if len(children) != 1:
        raise AssertionError(f"expected one child of {launched_pid}, got {children}")
    return children[0]
