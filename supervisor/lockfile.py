"""Lock files that hold a daemon's claim on a path for its lifetime.

The lock is an `flock` on an open file, so the kernel drops it when the
process ends, even by SIGKILL, and a stale file never blocks a new daemon.
The file holds the owner's pid, for error messages.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; `holder` is its pid as written."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        super().__init__(holder)


def take_lock(path: Path) -> int:
    """Lock `path` for this process and write our pid; return the open fd.

    Raises LockHeld when another process holds it, and OSError when the file
    cannot be opened (never through a symlink).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
