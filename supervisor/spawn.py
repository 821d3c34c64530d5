"""The start of a run's leader: its spec, its environment, and the
`subprocess.Popen` call.

A run's leader is started as the leader of a new session, with its output
on two new pipes, from the daemon's own thread with `subprocess.Popen`
(vfork, no `preexec_fn`). This module needs no event loop, so `runvisor
serve` can start its always-running projects before it imports trio; see
`supervisor.boot`. `supervisor.process` waits for, signals and reaps what
is started here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.config import ProjectConfig
from supervisor.errors import SpawnError

# The size of the buffer in which Linux (5.1 and later) reads a script's
# '#!' line (BINPRM_BUF_SIZE).
SHEBANG_MAX_BYTES = 256


# Loader variables that a PyInstaller executable changes for itself. Its
# bootloader keeps the user's value in NAME_ORIG (PyInstaller 6 docs,
# "Run-time information"); children get that value back, or none at all.
FROZEN_LOADER_VARIABLES = ("LD_LIBRARY_PATH", "LIBPATH", "DYLD_LIBRARY_PATH")


# Variables through which systemd talks to the daemon. A run that inherited
# NOTIFY_SOCKET could send READY=1 or MAINPID= as if it were runvisor, which
# the unit allows (NotifyAccess=all) because the single executable's
# bootloader and its Python child are two processes.
DAEMON_ONLY_VARIABLES = (
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
)


DATA_DIR_VARIABLE = "RUNVISOR_DATA_DIR"


# File descriptors that a spawn needs in the daemon at most (pipes, the
# error pipe of the fork, a pidfd) and that a run then keeps (two pipes, a
# pidfd, its log file).
SPAWN_DESCRIPTORS = 8


# File descriptors kept free for the control socket, the database and log
# files. A run that would leave fewer is not started, so the daemon still
# serves status and stop requests when runs use up the rest.
# NOTE: 64 is an estimate of what these need at once, not a measured bound.
RESERVED_DESCRIPTORS = 64


@dataclass(frozen=True)
class ProcessSpec:
    """What to run: `command` is split like a shell word list, not run by a
    shell, and a relative program path resolves against `cwd`.

    `markers` are environment variables, added to `env`, that together
    identify the processes of this run, wherever their group went.
    `setting` is the config key that contains `command`, named in errors.
    """

    command: str
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)
    markers: Mapping[str, str] = field(default_factory=dict)
    setting: str = "command"


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Build a child's environment: the daemon's, plus `extra`.

    In a frozen executable the loader variables are restored to the values
    the user had before the bootloader changed them, and removed when the
    user had none. The variables systemd gives the daemon itself are removed.
    """
    env = dict(os.environ)
    for name in DAEMON_ONLY_VARIABLES:
        env.pop(name, None)
    if getattr(sys, "frozen", False):
        for name in FROZEN_LOADER_VARIABLES:
            original = env.pop(f"{name}_ORIG", None)
            if original is None:
                env.pop(name, None)
            else:
                env[name] = original
    env.update(extra)
    return env


def resolve_argv(spec: ProcessSpec) -> list[str]:
    """Split the command and check that its program can be started.

    Raises SpawnError when the folder or the program is missing or the
    program is not executable, so the run fails with a reason instead of an
    opaque exec error.
    """
    if not spec.cwd.is_dir():
        raise SpawnError(
            f"The project folder {str(spec.cwd)!r} does not exist. "
            "Create it or fix 'path' in the config."
        )
    try:
        argv = shlex.split(spec.command)
    except ValueError as error:
        raise SpawnError(f"Cannot parse command {spec.command!r}: {error}.") from None
    if not argv:
        raise SpawnError(f"The command is empty. Set '{spec.setting}' in the config.")

    program = argv[0]
    if "/" in program:
        path = Path(program) if os.path.isabs(program) else spec.cwd / program
        if not path.exists():
            raise SpawnError(
                f"{program!r} does not exist in {str(spec.cwd)!r}. "
                f"Create it or fix '{spec.setting}' in the config."
            )
        if path.is_dir() or not os.access(path, os.X_OK):
            raise SpawnError(
                f"{program!r} in {str(spec.cwd)!r} is not executable. "
                f"Run 'chmod +x {program}'."
            )
    return argv


def describe_missing_interpreter(spec: ProcessSpec, program: str) -> str | None:
    """Explain why exec of `program` failed with ENOENT although the file
    exists, or return None when the file is missing.

    The kernel reports a missing `#!` interpreter, or a missing ELF loader,
    as ENOENT of the program itself.
    """
    first_line = _first_line(program_path(spec, program))
    if first_line is None:
        return None
    if not first_line.startswith(b"#!"):
        return (
            "the file exists, so the dynamic loader named in it is probably "
            "missing, as for a program built for another system."
        )
    # The kernel splits the interpreter from its argument at a space or tab.
    words = re.split(rb"[ \t]+", first_line[2:].strip(b" \t"), maxsplit=1)
    interpreter = os.fsdecode(words[0])
    reason = f"the interpreter {interpreter!r} named on its first line was not found."
    if interpreter.endswith("\r"):
        return (
            f"{reason} The line ends with a carriage return: save the file "
            "with Unix (LF) line endings."
        )
    return f"{reason} Install it or fix the '#!' line."


def program_path(spec: ProcessSpec, program: str) -> str | None:
    """Return the file that exec of `program` runs, or None when none is
    found."""
    if "/" in program:
        return os.path.join(spec.cwd, program)
    return shutil.which(program, path=spec.env.get("PATH", os.defpath))


def _first_line(path: str | None) -> bytes | None:
    """Return the first line of a file as the kernel reads it for a '#!'
    line, or None when the file is missing or unreadable."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as file:
            # Linux reads at most this much of a script for its '#!' line.
            return file.read(SHEBANG_MAX_BYTES).split(b"\n", 1)[0]
    except OSError:
        return None


# Options on a '#!/bin/bash' line under which bash still reads BASH_ENV, and
# runs the gate before any line of the script. (`-p` and `--posix` skip
# BASH_ENV; `-x` would print the gate's lines into the run's log.)
_GATE_SAFE_OPTIONS = re.compile(rb"-[eu]+")


def can_hold(spec: ProcessSpec, argv: Sequence[str]) -> bool:
    """Tell whether a run of `argv` can be started ahead of time and held
    at a gate: its leader must be bash running a script, so that BASH_ENV
    runs the gate first.

    That is `bash SCRIPT ...`, or a script whose '#!' line names bash
    (`#!/bin/bash`, `#!/usr/bin/env bash`, with at most the options -e and -u).
    """
    if "BASH_ENV" in spec.env:
        return False
    program = argv[0]
    if os.path.basename(program) == "bash":
        return len(argv) > 1 and not argv[1].startswith("-")
    first_line = _first_line(program_path(spec, program))
    if first_line is None or not first_line.startswith(b"#!"):
        return False
    words = re.split(rb"[ \t]+", first_line[2:].strip(b" \t"))
    interpreter = os.path.basename(words[0])
    if interpreter == b"env":
        return words[1:] == [b"bash"]
    if interpreter != b"bash":
        return False
    return len(words) == 1 or (
        len(words) == 2 and _GATE_SAFE_OPTIONS.fullmatch(words[1]) is not None
    )


def descriptor_limit_message(in_use: int | None = None) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = "" if in_use is None else f"{in_use} of "
    return (
        f"runvisor has {used}its {soft} file descriptors in use. Raise the "
        "limit (ulimit -n, or LimitNOFILE= in the systemd unit) or run fewer "
        "projects at once."
    )


@dataclass
class _DescriptorCount:
    checks_left: int = 0
    """Checks that pass without counting again."""


_descriptors = _DescriptorCount()


def check_descriptors() -> None:
    """Raise SpawnError when a spawn would leave fewer than
    RESERVED_DESCRIPTORS file descriptors free.

    Counting lists /proc/self/fd, which is slow while other threads fork.
    After a count, the next checks pass without counting, up to half the
    spawns that the free room fits at SPAWN_DESCRIPTORS each.
    """
    if _descriptors.checks_left > 0:
        _descriptors.checks_left -= 1
        return
    counted = _count_descriptors()
    if counted is None:
        return
    in_use, room = counted
    if room < SPAWN_DESCRIPTORS:
        raise SpawnError(
            "Not started, to keep file descriptors free for the control socket "
            f"and the history: {descriptor_limit_message(in_use)}"
        )
    _descriptors.checks_left = room // SPAWN_DESCRIPTORS // 2


def runs_that_fit() -> int | None:
    """Return how many more runs the file descriptor limit leaves room for,
    at SPAWN_DESCRIPTORS each and with RESERVED_DESCRIPTORS kept free, or
    None when there is no limit."""
    counted = _count_descriptors()
    if counted is None:
        return None
    _, room = counted
    return max(0, room // SPAWN_DESCRIPTORS)


def _count_descriptors() -> tuple[int, int] | None:
    """Return the descriptors in use and those free beyond
    RESERVED_DESCRIPTORS, or None when there is no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    in_use = len(os.listdir("/proc/self/fd"))
    return in_use, soft - in_use - RESERVED_DESCRIPTORS


def describe_os_error(error: OSError) -> str:
    """Describe an OSError of a run's start as a sentence, with the fix when
    the daemon ran out of file descriptors."""
    text = error.strerror or str(error)
    if error.filename is not None:
        text = f"{text}: {error.filename}"
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return f"{text}. {descriptor_limit_message()}"
    return f"{text}."


GATE_FD_VARIABLE = "RUNVISOR_GATE_FD"


def find_processes(
    markers: Mapping[str, str], among: Iterable[int] | None = None
) -> list[int]:
    """Find live processes whose environment contains every one of `markers`.

    Every run's processes inherit the run's marker variables, and a process
    that called setsid keeps them, so the environment identifies them after
    they left the group or after a daemon crash. Only processes of the
    daemon's own user are readable, which are the only ones it may signal.

    NOTE: a process that left the group and replaced its environment
    (`env -i`, an execve with a new one) is not found; under systemd the
    unit's cgroup still ends it when the daemon stops.
    """
    wanted = {f"{name}={value}".encode() for name, value in markers.items()}
    if not wanted:
        raise ValueError("find_processes needs at least one marker.")
    found: list[int] = []
    own_pid = os.getpid()
    if among is None:
        among = (
            int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()
        )
    for pid in among:
        if pid == own_pid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                variables = set(file.read().split(b"\0"))
        except OSError:
            continue
        if wanted <= variables:
            found.append(pid)
    return found


def kill_run(leader: int, markers: Mapping[str, str]) -> None:
    """Send SIGKILL to a run's process group and to the processes that
    carry its markers outside the group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)
    if not markers:
        return
    for pid in find_processes(markers):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_spec(
    project: ProjectConfig,
    variables: Mapping[str, str],
    data_dir: str | Path,
    run_id: int,
    trigger: str,
) -> ProcessSpec:
    """Build what a run starts: the project's command in its folder, with
    its variables and the run's markers."""
    markers = run_markers(data_dir, project.name, run_id)
    env = child_environment({**variables, **markers, "RUNVISOR_TRIGGER": trigger})
    return ProcessSpec(
        command=project.command, cwd=Path(project.path), env=env, markers=markers
    )


def run_markers(data_dir: str | Path, project: str, run_id: int) -> dict[str, str]:
    """Return the environment variables that mark every process of a run.

    The data dir distinguishes the runs of two daemons on one machine,
    which may both have a project of that name and a run of that id.
    """
    return {
        DATA_DIR_VARIABLE: str(Path(data_dir)),
        "RUNVISOR_PROJECT": project,
        "RUNVISOR_RUN_ID": str(run_id),
    }


def spawn_leader(
    argv: list[str], spec: ProcessSpec, gate: tuple[Path, int] | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start `argv` as the leader of a new session, with its output on two
    new pipes; return it and the reading ends of those pipes.

    With `gate` (a gate script and the reading end of a pipe), bash runs
    the script through BASH_ENV before the run's own script.

    Raises SpawnError when the leader cannot be started.
    """
    check_descriptors()
    try:
        return _popen(argv, spec, gate)
    except OSError as error:
        reason = f"{error.strerror or error}."
        if error.errno == errno.ENOEXEC:
            reason = "exec format error (is the first line a valid '#!' line?)."
        elif error.errno == errno.ENOENT:
            reason = describe_missing_interpreter(spec, argv[0]) or reason
        elif error.errno in (errno.EMFILE, errno.ENFILE):
            reason += f" {descriptor_limit_message()}"
        raise SpawnError(f"Cannot start {argv[0]!r}: {reason}") from None


def _popen(
    argv: list[str], spec: ProcessSpec, gate: tuple[Path, int] | None
) -> tuple[subprocess.Popen[bytes], int, int]:
    env = {**spec.env, **spec.markers}
    pass_fds: tuple[int, ...] = ()
    if gate is not None:
        script, gate_read = gate
        env["BASH_ENV"] = str(script)
        env[GATE_FD_VARIABLE] = str(gate_read)
        pass_fds = (gate_read,)
    out_read, out_write = os.pipe()
    try:
        err_read, err_write = os.pipe()
    except BaseException:
        os.close(out_read)
        os.close(out_write)
        raise
    try:
        popen = subprocess.Popen(
            argv,
            cwd=str(spec.cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_write,
            stderr=err_write,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        # The child has its own copies; the pipes reach EOF once every
        # process of the run has closed them.
        os.close(out_write)
        os.close(err_write)
    return popen, out_read, err_read


@dataclass
class _Subreaper:
    active: bool = False
    """Whether `become_subreaper` succeeded: only then does every process of
    a run stay a descendant of this daemon, which the process-tree walks
    of `supervisor.process` rely on."""


_subreaper = _Subreaper()


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux).

    Orphaned grandchildren of runs, including those that left their group
    with setsid, are then re-parented to the daemon instead of init, so they
    can still be found and ended. Return False where this is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    _subreaper.active = bool(result == 0)
    return _subreaper.active


def is_subreaper() -> bool:
    return _subreaper.active
