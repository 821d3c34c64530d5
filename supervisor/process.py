"""Waiting for, signalling and reaping run processes.

With `supervisor.spawn`, which starts a run's leader, this is the only
module that starts or signals OS processes. Every run leads
its own session and process group (`start_new_session=True`), so a Ctrl-C
typed at the daemon's terminal never reaches it, and stopping a run signals
the whole group: the stop signal, then SIGKILL after the grace period, then
SIGKILL once more after the leader is reaped, because a grandchild that
ignores the stop signal outlives its leader otherwise.

A run is over when its leader has exited *and* its process group is empty.
The end of the leader is detected with `wait()` (a pidfd), never with EOF on
its pipes, since a grandchild can hold them open. The group has no event to
wait on, so emptiness is polled with `killpg(pgid, 0)`, but only during the
bounded clean-up after the leader has exited.

A process that calls setsid leaves the group, but keeps the run's marker
variables (`ProcessSpec.markers`) in its environment. Stop and clean-up
find such processes in /proc by those markers and end them with the group,
with the same signal and grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from supervisor.logs import LineSplitter
from supervisor.model import Stream
from supervisor.spawn import (
    DATA_DIR_VARIABLE,
    ProcessSpec,
    can_hold,
    find_processes,
    is_subreaper,
    kill_run,
    program_path,
    resolve_argv,
    spawn_leader,
)

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024
# How often group emptiness is checked while a stop or clean-up waits.
GROUP_POLL_SECONDS = 0.02
# After SIGKILL a group should vanish at once; a process stuck in
# uninterruptible sleep (D state) can delay it, so give up waiting after this.
KILLED_GROUP_WAIT_SECONDS = 5.0
# Output that a dead run's grandchildren may still hold in the pipes is read
# for at most this long after the group is gone.
PIPE_DRAIN_SECONDS = 0.5


OutputCallback = Callable[[Stream, Sequence[str], float], None]


@dataclass(frozen=True)
class ExitStatus:
    """End of a process: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(exit_code=None, signal=-returncode)
        return cls(exit_code=returncode, signal=None)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exit code {self.exit_code}"


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group. Return False when the group is empty."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed its credentials (setuid program). It can no longer
        # be signalled by us; treat the group as still present.
        logger.warning("no permission to signal process group %d", pgid)
    return True


def reap_group(pgid: int) -> None:
    """Reap exited members of a group that were re-parented to this process.

    Only members adopted through the child subreaper flag are ours to reap.
    Call this only after the group's leader has been reaped by its owner, so
    its exit status cannot be taken away from it here.
    """
    while True:
        try:
            result = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return
        if result is None:
            return


def group_exists(pgid: int) -> bool:
    """Return whether the group has a member that has not exited.

    A zombie still counts for `killpg`, and one whose new parent reaps slowly
    (an init that reaps once a second, say) would delay every stop, so when
    `killpg` finds members, /proc shows whether any of them is alive.
    """
    reap_group(pgid)
    if not signal_group(pgid, 0):
        return False
    return bool(_live_group_members(pgid))


def _stat_fields(pid: int | str) -> list[bytes]:
    """Return the fields of /proc/PID/stat after the command name (state,
    ppid, pgrp, ...), or an empty list when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return []
    # The command name in brackets may contain spaces and brackets.
    return stat[stat.rfind(b")") + 2 :].split()


def _live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def is_alive(pid: int) -> bool:
    """Return whether a process exists and has not exited (zombies have)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if len(fields) > 2 else None


def reap_adopted(pids: list[int]) -> None:
    """Reap those of `pids` that exited and are children of this process.

    A process that left its run's group is re-parented to the daemon when
    the daemon is the child subreaper, and stays a zombie until reaped. Pass
    no pid of a run leader: its owner reaps it.
    """
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


async def wait_group_empty(pgid: int) -> None:
    while group_exists(pgid):
        await trio.sleep(GROUP_POLL_SECONDS)


async def wait_processes_gone(pids: list[int]) -> None:
    """Wait until none of `pids` is alive; a zombie counts as gone."""
    while any(is_alive(pid) for pid in pids):
        await trio.sleep(GROUP_POLL_SECONDS)


def signal_processes(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def end_group(pgid: int, sig: int, timeout: float) -> bool:
    """Stop whatever is left of a group: `sig`, then SIGKILL after `timeout`.

    Return True when SIGKILL was needed.
    """
    if not group_exists(pgid):
        return False
    signal_group(pgid, sig)
    with trio.move_on_after(timeout):
        await wait_group_empty(pgid)
        return False
    signal_group(pgid, signal.SIGKILL)
    with trio.move_on_after(KILLED_GROUP_WAIT_SECONDS):
        await wait_group_empty(pgid)
        return True
    logger.warning(
        "process group %d still has members %.0f s after SIGKILL",
        pgid,
        KILLED_GROUP_WAIT_SECONDS,
    )
    return True


class _Leader:
    """A run's leader process, spawned with `subprocess.Popen` from the
    event loop's thread, its pipes, and the wait for its exit.

    `trio.lowlevel.open_process` spawns in a worker thread. When 200 runs
    start at once, those threads fight over the GIL and fork side by side,
    which delayed the last start of a minute boundary by over 100 ms in
    bench/. Popen uses vfork here (no `preexec_fn`), so a spawn blocks the
    event loop only until the child has called exec.

    The exit is awaited on a pidfd (Linux 5.3 and later), or else by
    `waitid(WNOWAIT)` in a worker thread, as trio does.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(popen.pid)
        self._watcher_done: trio.Event | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the leader to exit, reap it, and return its return code.

        Any number of tasks may wait at once. One of them watches for the
        exit and wakes the others, and if it is cancelled, another one takes
        over.
        """
        while self._popen.returncode is None:
            if self._watcher_done is not None:
                await self._watcher_done.wait()
                continue
            self._watcher_done = trio.Event()
            try:
                await self._exited()
                # The leader has exited, so this reaps it without blocking.
                self._popen.wait()
                self.close()
            finally:
                self._watcher_done.set()
                self._watcher_done = None
        return self._popen.returncode

    async def _exited(self) -> None:
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
            return
        await trio.to_thread.run_sync(
            os.waitid,
            os.P_PID,
            self.pid,
            os.WEXITED | os.WNOWAIT,
            abandon_on_cancel=True,
        )

    def close(self) -> None:
        """Close the pidfd. Call it only once the leader has been reaped."""
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _wrap(
    started: tuple[subprocess.Popen[bytes], int, int],
) -> tuple[_Leader, trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """Take a leader from `spawn_leader` into trio, and register it, so
    the orphan reaper leaves its exit status to its owner."""
    popen, out_read, err_read = started
    _leaders.pids.add(popen.pid)
    return (
        _Leader(popen),
        trio.lowlevel.FdStream(out_read),
        trio.lowlevel.FdStream(err_read),
    )


class ChildProcess:
    """A started run: its leader process, its process group, and the
    processes that left the group but carry the run's markers."""

    def __init__(
        self, process: _Leader, markers: Mapping[str, str] | None = None
    ) -> None:
        self._process = process
        self._markers = dict(markers or {})
        self.pid = process.pid
        self.started_at = trio.current_time()
        self.ended_at: float | None = None
        self.killed = False
        self.exit_status: ExitStatus | None = None
        self._signalled_at: float | None = None

    @property
    def uptime(self) -> float:
        """Seconds the leader lived, or has lived so far (monotonic clock)."""
        end = self.ended_at if self.ended_at is not None else trio.current_time()
        return end - self.started_at

    async def wait(self) -> ExitStatus:
        """Wait for the leader to exit."""
        returncode = await self._process.wait()
        if self.ended_at is None:
            self.ended_at = trio.current_time()
        self.exit_status = ExitStatus.from_returncode(returncode)
        return self.exit_status

    def send_signal(self, sig: int) -> None:
        signal_group(self.pid, sig)

    def begin_stop(self, sig: int) -> None:
        """Send the stop signal `sig` to the group now, ahead of `stop`.

        The stop that follows does not send it again (a second SIGTERM or
        SIGINT means "quit at once" to many programs) and counts its grace
        period from this moment.
        """
        if self._signalled_at is None:
            self._signalled_at = trio.current_time()
            signal_group(self.pid, sig)

    def escaped(self) -> list[int]:
        """Live processes of the run outside its process group."""
        if not self._markers:
            return []
        # A full /proc scan per call made stopping 100 runs at once several
        # times slower than supervisord in bench/; walking the process trees
        # reads the environment of the run's own processes only.
        candidates = run_candidates(self.pid)
        return [
            pid
            for pid in find_processes(self._markers, among=candidates)
            if process_group(pid) != self.pid and is_alive(pid)
        ]

    async def stop(self, sig: int, timeout: float) -> ExitStatus:
        """Stop the whole run: `sig` to the group and to the processes that
        left it, SIGKILL to all of them after `timeout`, and a last SIGKILL
        once the leader is reaped. Shielded, so it always finishes."""
        with trio.CancelScope(shield=True):
            if await self._end_all(sig, timeout):
                self.killed = True
        assert self.exit_status is not None
        return self.exit_status

    async def end_leftovers(self, sig: int, timeout: float) -> bool:
        """End what the run left after its leader exited by itself: the rest
        of its group and the processes that left the group.

        Return True when SIGKILL was needed.
        """
        if not group_exists(self.pid) and not self.escaped():
            return False
        killed = False
        with trio.CancelScope(shield=True):
            killed = await self._end_all(sig, timeout)
        return killed

    async def _end_all(self, sig: int, timeout: float) -> bool:
        self.begin_stop(sig)
        assert self._signalled_at is not None
        deadline = self._signalled_at + timeout
        # Let the other runs that stop now signal their groups first: the
        # search for processes that left the group reads /proc, and in a
        # fleet stop it would delay the last group's signal by every other
        # run's search. An escaped process whose parent exits meanwhile is
        # adopted by this daemon, where the search still finds it.
        await trio.lowlevel.checkpoint()
        escaped = self.escaped()
        signal_processes(escaped, sig)
        with trio.move_on_at(deadline):
            await self.wait()
            await wait_group_empty(self.pid)
            await wait_processes_gone(escaped)
        killed = False
        if group_exists(self.pid) or any(is_alive(pid) for pid in escaped):
            killed = True
            signal_group(self.pid, signal.SIGKILL)
            signal_processes(escaped, signal.SIGKILL)
        await self.wait()
        # A grandchild that ignored `sig` outlives its leader otherwise, and
        # one may have left the group while the group was being stopped.
        await end_group(self.pid, signal.SIGKILL, KILLED_GROUP_WAIT_SECONDS)
        late = self.escaped()
        signal_processes(late, signal.SIGKILL)
        with trio.move_on_after(KILLED_GROUP_WAIT_SECONDS):
            await wait_processes_gone(escaped + late)
        reap_adopted(escaped + late)
        return killed


async def _pump(
    stream: trio.abc.ReceiveStream,
    kind: Stream,
    on_output: OutputCallback,
    done: trio.Event,
    scope: trio.CancelScope,
    keep_whole: Sequence[str],
) -> None:
    splitter = LineSplitter(keep_whole)
    try:
        with scope:
            while chunk := await stream.receive_some(READ_CHUNK_BYTES):
                # One timestamp per read, not per line: formatting a time per
                # line would cap throughput well below the pipe's rate.
                lines = splitter.feed(chunk)
                if lines:
                    on_output(kind, lines, time.time())
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        rest = splitter.finish()
        if rest:
            on_output(kind, rest, time.time())
        done.set()


def _start(
    argv: list[str], spec: ProcessSpec, gate: tuple[Path, int] | None = None
) -> tuple[_Leader, trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """Start a run's leader and take it into trio.

    Raises SpawnError when it cannot be started.
    """
    return _wrap(spawn_leader(argv, spec, gate))


# The gate of a run started ahead of its fire time. Bash reads it through
# BASH_ENV before the first line of the run's script and waits for "go" on
# the pipe. When the pipe closes without it (the run was called off, or the
# daemon died), bash exits, so the script never runs unsupervised.
GATE_SCRIPT = """\
# Written by runvisor: keeps a scheduled run waiting until its fire time.
IFS= read -r -u "$RUNVISOR_GATE_FD" __runvisor_go || exit 75
exec {RUNVISOR_GATE_FD}<&-
unset BASH_ENV RUNVISOR_GATE_FD __runvisor_go
"""
# The exit code of a held leader whose gate closed without "go".
GATE_CLOSED_EXIT_CODE = 75


def write_gate_script(data_dir: str | Path) -> Path:
    """Write GATE_SCRIPT into `data_dir` unless it is there already; return
    its path. Bash that cannot read it would run the script at once, so
    this is called before every held start."""
    path = Path(data_dir) / "gate.bash"
    with contextlib.suppress(OSError):
        if path.read_text() == GATE_SCRIPT:
            return path
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as file:
        file.write(GATE_SCRIPT)
    os.replace(partial, path)
    return path


def _file_version(path: str) -> tuple[int, int, int, int] | None:
    """Return what changes when a file is replaced or written to."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class StartedProcess:
    """A run's leader that was started before its run took it over.

    Pass it to `open_process`, which owns it from then on; `discard` ends
    one that is not used. `started_at` is trio's time at its start, when
    that came before the run's, so that the run's uptime counts from it.
    """

    def __init__(
        self,
        started: tuple[_Leader, trio.lowlevel.FdStream, trio.lowlevel.FdStream],
        spec: ProcessSpec,
        started_at: float | None = None,
    ) -> None:
        self._started = started
        self.spec = spec
        self.pid = started[0].pid
        self.started_at = started_at
        self._taken = False

    def release(self) -> None:
        """Let the run's script start; it already has."""

    def discard(self) -> None:
        """End a leader that was not handed to `open_process`: kill its
        group and the processes that left it, and reap it in the
        background."""
        self._close_gate()
        if self._taken:
            return
        self._taken = True
        leader, stdout, stderr = self._started
        kill_run(leader.pid, self.spec.markers)

        async def reap() -> None:
            # Shielded and bounded: SIGKILL ends a process blocked in `read`
            # at once, and the daemon's shutdown should not leave a zombie.
            with trio.move_on_after(KILLED_GROUP_WAIT_SECONDS) as scope:
                scope.shield = True
                await leader.wait()
                _leaders.pids.discard(leader.pid)
                await stdout.aclose()
                await stderr.aclose()

        trio.lowlevel.spawn_system_task(reap, name=f"discard pid {leader.pid}")

    def _take(
        self,
    ) -> tuple[_Leader, trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
        if self._taken:
            raise RuntimeError(f"started process {self.pid} was already used")
        self._taken = True
        return self._started

    def _close_gate(self) -> None:
        pass


def adopt_process(
    popen: subprocess.Popen[bytes],
    stdout: int,
    stderr: int,
    spec: ProcessSpec,
    age: float,
) -> StartedProcess:
    """Take over a leader that `spawn_leader` started `age` seconds ago,
    before trio ran, with the reading ends of its output pipes."""
    return StartedProcess(
        _wrap((popen, stdout, stderr)), spec, trio.current_time() - age
    )


class HeldProcess(StartedProcess):
    """A run's leader, started ahead of time and held at its gate.

    Starting bash is most of what a run's start costs. When 200 scheduled
    runs fire at one minute boundary, starting each one then makes the last
    start hundreds of milliseconds late on two cores. Started a few seconds
    early, they are released at the boundary by one line written to each
    gate. Pass it to `open_process`, which owns it from then
    on, and call `release` there; `discard` ends one that is not used.
    """

    def __init__(self, spec: ProcessSpec, gate_script: Path) -> None:
        argv = resolve_argv(spec)
        if not can_hold(spec, argv):
            raise ValueError(f"cannot hold {spec.command!r}: its leader is not bash")
        if os.path.basename(argv[0]) == "bash":
            script = os.path.join(spec.cwd, argv[1])
        else:
            script = program_path(spec, argv[0]) or argv[0]
        self._script = script
        self._script_version = _file_version(self._script)
        gate_read, self._gate = os.pipe()
        try:
            started = _start(argv, spec, (gate_script, gate_read))
        except BaseException:
            os.close(self._gate)
            raise
        finally:
            os.close(gate_read)
        super().__init__(started, spec)

    def script_changed(self) -> bool:
        """Tell whether the script was replaced or edited since the start.

        Bash has opened it and read its '#!' line, and reads the rest as it
        runs, so a script rewritten in place would run under the old
        interpreter, or from the middle of a line.
        """
        return _file_version(self._script) != self._script_version

    def release(self) -> None:
        """Let the run's script start."""
        if self._gate >= 0:
            # A leader that is gone already leaves the pipe broken, and its
            # exit status is read as usual.
            with contextlib.suppress(BrokenPipeError):
                os.write(self._gate, b"go\n")
            self._close_gate()

    def _close_gate(self) -> None:
        if self._gate >= 0:
            os.close(self._gate)
            self._gate = -1


@contextlib.asynccontextmanager
async def open_process(
    spec: ProcessSpec,
    on_output: OutputCallback,
    *,
    stop_signal: int = signal.SIGTERM,
    stop_timeout: float = 10.0,
    keep_whole: Sequence[str] = (),
    started: StartedProcess | None = None,
) -> AsyncIterator[ChildProcess]:
    """Start a run and yield it; on leaving, make sure it is over.

    Leaving the block (normally, by an error or by cancellation) stops the
    leader if it is still running, ends the rest of its process group with
    the same signal and grace period, and drains the pipes, all in a shielded
    scope. Output lines are passed to `on_output(stream, lines, epoch)`; an
    overlong line is cut into pieces, never inside one of the `keep_whole`
    texts (the secrets that `on_output` masks).

    With `started`, the run is that process, which the caller releases
    inside the block when it is held; a held one left unreleased exits
    when the block closes its gate.

    Raises SpawnError when the run cannot be started.
    """
    if started is not None:
        process, stdout, stderr = started._take()
    else:
        process, stdout, stderr = _start(resolve_argv(spec), spec)

    child = ChildProcess(process, spec.markers)
    if started is not None and started.started_at is not None:
        child.started_at = started.started_at
    pumps_done = (trio.Event(), trio.Event())
    # Shielded, so a cancellation of the run (a daemon shutdown) does not
    # stop the reading: what the run prints while it stops, such as a
    # SIGTERM handler's last words, still reaches the log. They end when
    # the pipes close, or when the drain below gives up.
    pump_scopes = (trio.CancelScope(shield=True), trio.CancelScope(shield=True))
    async with trio.open_nursery() as pumps:
        for stream, kind, done, scope in zip(
            (stdout, stderr),
            (Stream.OUT, Stream.ERR),
            pumps_done,
            pump_scopes,
            strict=True,
        ):
            pumps.start_soon(_pump, stream, kind, on_output, done, scope, keep_whole)
        try:
            yield child
        finally:
            if started is not None:
                started._close_gate()
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    await child.stop(stop_signal, stop_timeout)
                else:
                    # Records the exit status when the leader died of a
                    # signal that `begin_stop` sent before the cancellation.
                    await child.wait()
                    if await child.end_leftovers(stop_signal, stop_timeout):
                        child.killed = True
                # EOF comes once every holder of the pipes is gone; a process
                # that left the group with setsid may keep them open forever.
                with trio.move_on_after(PIPE_DRAIN_SECONDS):
                    for done in pumps_done:
                        await done.wait()
                for scope in pump_scopes:
                    scope.cancel()
                pumps.cancel_scope.cancel()
                await stdout.aclose()
                await stderr.aclose()
                process.close()
                _leaders.pids.discard(child.pid)


@dataclass
class _Leaders:
    """The run leaders that this process spawned and has not reaped yet.

    The orphan reaper must leave them alone: their owners reap them, and a
    stolen exit status would read as exit code 0.
    """

    pids: set[int] = field(default_factory=set)


_leaders = _Leaders()


def reap_orphans_now() -> None:
    """Reap the exited processes that were re-parented to this process.

    As the child subreaper, the daemon adopts every orphaned process of its
    runs, and each one that exits stays a zombie until the daemon reaps it.
    Reaped here: zombie children outside the daemon's own session, which are
    not run leaders. A child that a library started without a new session
    keeps the daemon's session and is left to its owner. Spawns run in the
    event loop's thread too, so a new leader is in `_leaders` before this
    can run.

    NOTE: a child that a library in the daemon starts in a new session (no
    library used here does) would be reaped here, and its owner would read
    exit code 0.
    """
    own_pid = os.getpid()
    own_session = os.getsid(0)
    # The daemon's children lists (zombies included) spare reading the stat
    # of every process on the machine at each SIGCHLD.
    children = _child_pids(own_pid)
    if children is None:
        candidates = [
            entry.name for entry in os.scandir("/proc") if entry.name.isdigit()
        ]
    else:
        candidates = [str(pid) for pid in children]
    for name in candidates:
        # Fields: state, ppid, pgrp, session, ...
        fields = _stat_fields(name)
        if len(fields) < 4 or fields[0] != b"Z" or int(fields[1]) != own_pid:
            continue
        pid = int(name)
        if pid in _leaders.pids or int(fields[3]) == own_session:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


async def reap_orphans(
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reap adopted processes of runs as they exit (on SIGCHLD), until
    cancelled. Must run in the main thread."""
    with trio.open_signal_receiver(signal.SIGCHLD) as signals:
        task_status.started()
        reap_orphans_now()
        async for _ in signals:
            reap_orphans_now()


def _child_pids(pid: int) -> list[int] | None:
    """Direct children of `pid`, or None where the kernel has no
    /proc/PID/task/TID/children lists (CONFIG_PROC_CHILDREN)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                children.extend(int(word) for word in file.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue
            return None
        except OSError:
            continue
    return children


def _adopted_or_leaders() -> list[int] | None:
    """Children of this daemon's main thread: every process it adopted, and
    the run leaders, which the event loop spawns from that thread.

    The kernel gives an orphan to the first live thread of the subreaper,
    which is the main thread. Other threads start no processes, so their
    lists are not read: a burst of database writes and credential lookups
    leaves dozens of worker threads, and this runs at the end of every run.
    """
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(word) for word in file.read().split()]
    except FileNotFoundError:
        return None


def _descendants(roots: list[int]) -> list[int] | None:
    found: list[int] = []
    pending = list(roots)
    while pending:
        children = _child_pids(pending.pop())
        if children is None:
            return None
        found.extend(children)
        pending.extend(children)
    return found


def run_candidates(leader: int) -> list[int] | None:
    """Processes that may belong to the run led by `leader`, found by
    walking process trees instead of reading every process's environment.

    While this daemon is a child subreaper, each process of a run is a
    descendant of the run's leader, or of this daemon once its parent died.
    The candidates are the leader's descendants plus the processes the
    daemon adopted (children that are no run leaders) and their descendants.
    Return None when the trees cannot be walked; callers then scan /proc.
    """
    if not is_subreaper():
        return None
    own_children = _adopted_or_leaders()
    if own_children is None:
        return None
    adopted = [pid for pid in own_children if pid not in _leaders.pids]
    tree = _descendants([leader, *adopted])
    if tree is None:
        return None
    return [*adopted, *tree]


def find_run_processes(project: str, run_id: int) -> list[int]:
    """Find live processes that belong to a run, wherever their group went."""
    return find_processes({"RUNVISOR_PROJECT": project, "RUNVISOR_RUN_ID": str(run_id)})


async def end_processes(
    pids: list[int], timeout: float = 5.0, sig: int = signal.SIGTERM
) -> None:
    """Send `sig` to each process, then SIGKILL whatever is left after
    `timeout`.

    A process that exited counts as gone even while it waits, as a zombie,
    for a parent that reaps slowly.
    """
    signal_processes(pids, sig)
    with trio.move_on_after(timeout):
        await wait_processes_gone(pids)
        return
    signal_processes([pid for pid in pids if is_alive(pid)], signal.SIGKILL)


@dataclass(frozen=True)
class StopSettings:
    """How to stop the processes of one project: signal, then grace."""

    signal: int = signal.SIGTERM
    timeout: float = 5.0


@dataclass(frozen=True)
class LeftoverRun:
    """A run of a daemon that died, found by its processes' markers."""

    project: str
    run_id: str
    trigger: str
    pids: tuple[int, ...]


async def end_leftover_runs(
    data_dir: str | Path, settings: Mapping[str, StopSettings]
) -> list[LeftoverRun]:
    """End every process of every run of the daemon of `data_dir`.

    Call it at start-up, before any run starts: a process marked with the
    data dir then belongs to a run of a daemon that died, whatever its row in
    the history records (a crash can come before the row is written, or between
    marking the row lost and ending its processes). The processes of a
    project get its stop signal and stop timeout from `settings`, those of a
    project no longer configured the defaults of `StopSettings`. Such
    processes are no children of this daemon, so they need no reaping.
    Return the runs found.
    """
    pids = find_processes({DATA_DIR_VARIABLE: str(Path(data_dir))})
    if not pids:
        return []
    by_run: dict[tuple[str, str, str], list[int]] = {}
    for pid in pids:
        environ = _read_environ(pid)
        key = (
            environ.get("RUNVISOR_PROJECT", "?"),
            environ.get("RUNVISOR_RUN_ID", "?"),
            environ.get("RUNVISOR_TRIGGER", "?"),
        )
        by_run.setdefault(key, []).append(pid)
    async with trio.open_nursery() as nursery:
        for (project, run_id, _), run_pids in sorted(by_run.items()):
            logger.warning(
                "ending %d leftover processes of lost run: project=%s run=%s pids=%s",
                len(run_pids),
                project,
                run_id,
                ",".join(map(str, run_pids)),
            )
            stop = settings.get(project, StopSettings())
            nursery.start_soon(end_processes, run_pids, stop.timeout, stop.signal)
    return [
        LeftoverRun(project, run_id, trigger, tuple(run_pids))
        for (project, run_id, trigger), run_pids in sorted(by_run.items())
    ]


def _read_environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            raw = file.read()
    except OSError:
        return {}
    variables = {}
    for item in raw.split(b"\0"):
        name, _, value = item.partition(b"=")
        variables[name.decode(errors="replace")] = value.decode(errors="replace")
    return variables
