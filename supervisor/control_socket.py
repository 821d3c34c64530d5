"""The daemon's listening control socket, created safely.

`open_control_socket` prepares the listening socket before the daemon
touches anything else, in this order:

1. The socket's folder must be a directory owned by the daemon's user that
   no one else may enter (0700). A missing folder is created that way.
2. An exclusive lock on `<socket>.lock` is held for the daemon's lifetime,
   so two daemons starting at once cannot both decide the path is free.
3. A file already at the path is examined without following links. A
   symbolic link or any other non-socket is rejected. A socket that accepts
   a connection belongs to a running daemon, so startup is rejected. A
   socket that refuses connections is a leftover of a crash and is removed.
4. The new socket gets mode 0600 with `fchmod` before `bind`, so it never
   exists with wider permissions.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import ControlError
from supervisor.lockfile import LockHeld, take_lock

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 64
STALE_CHECK_TIMEOUT = 2.0

_PEERCRED = struct.Struct("3i")


@dataclass
class ControlSocket:
    """A bound, listening control socket and the lock that guards its path."""

    path: Path
    sock: socket.socket
    lock_fd: int
    identity: tuple[int, int]
    """(st_dev, st_ino) of the socket file this daemon created."""

    def close(self) -> None:
        """Close the socket, remove its file if it is still ours, and
        release the lock. Safe to call more than once."""
        self.sock.close()
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self.identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("cannot remove the control socket %s: %s", self.path, error)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def open_control_socket(path: Path) -> ControlSocket:
    """Create the daemon's listening socket at `path`, safely.

    Raises:
        ControlError: the folder is unsafe, another daemon runs on this
            path, something other than a socket is at the path, or binding
            failed. The message explains the fix.
    """
    _prepare_folder(path.parent)
    lock_fd = _lock(path)
    try:
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(os.fspath(path))
            sock.listen(LISTEN_BACKLOG)
            info = os.lstat(path)
        except OSError as error:
            sock.close()
            raise ControlError(
                f"Cannot listen on the control socket {path}: {error}. Set "
                "[runvisor] socket to a shorter path in a folder of your own."
            ) from None
    except BaseException:
        os.close(lock_fd)
        raise
    logger.debug("listening on the control socket %s", path)
    return ControlSocket(path, sock, lock_fd, (info.st_dev, info.st_ino))


def _prepare_folder(folder: Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise ControlError(
            f"Cannot create the control socket folder {folder}: {error}."
        ) from None
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(
            f"The control socket folder {folder} is not a directory. Set "
            "[runvisor] socket to a path in a folder of your own."
        )
    if info.st_uid != os.geteuid():
        raise ControlError(
            f"The control socket folder {folder} belongs to user id "
            f"{info.st_uid}, not to you (user id {os.geteuid()}). Set "
            "[runvisor] socket to a path in a folder of your own."
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ControlError(
            f"The control socket folder {folder} has mode {mode:04o}, so other "
            "users could replace the socket. Run 'chmod 700 "
            f"{folder}' or set [runvisor] socket to a path in a private folder."
        )


def _lock(path: Path) -> int:
    lock_path = Path(f"{path}.lock")
    try:
        return take_lock(lock_path)
    except LockHeld as held:
        raise ControlError(
            f"Another runvisor daemon (pid {held.holder}) is already running "
            f"with the control socket {path}. Stop it with 'runvisor shutdown', "
            "or set another [runvisor] socket for this config."
        ) from None
    except OSError as error:
        raise ControlError(
            f"Cannot open the lock file {lock_path}: {error.strerror or error}. "
            "Make its folder writable, or set [runvisor] socket to a path in "
            "a folder of your own."
        ) from None


def _remove_stale_socket(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ControlError(
            f"The control socket path {path} is a symbolic link. runvisor does "
            "not follow links there: remove it, or set another [runvisor] socket."
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(
            f"{path} exists and is not a socket. Remove it, or set another "
            "[runvisor] socket."
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(STALE_CHECK_TIMEOUT)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        logger.info("removing the stale control socket %s", path)
        os.unlink(path)
        return
    except OSError as error:
        raise ControlError(f"Cannot check the socket at {path}: {error}.") from None
    else:
        pid, _, _ = _PEERCRED.unpack(
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        raise ControlError(
            f"Another runvisor daemon (pid {pid}) is already listening on "
            f"{path}. Stop it with 'runvisor shutdown', or set another "
            "[runvisor] socket for this config."
        )
    finally:
        probe.close()
