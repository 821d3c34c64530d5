"""The start of `runvisor serve`, before the event loop: the daemon's
resources, and the first runs of always-running projects.

Most of the time `serve` takes to get 100 always-running projects running
is fixed cost: the interpreter, trio and the daemon's modules take about
0.2 s to import, and starting 100 bash scripts takes as long again on two
cores. So `serve` first loads the config, takes the control socket and the
data dir's lock, and starts the leaders of the always-running projects.
It imports the rest while they start. The daemon then takes each one over
as the first run of its project (trigger `startup`) and reads what it
printed meanwhile from its pipes.

A project is started here only when nothing has to come first:

- No process of an earlier daemon of this data dir is left. The daemon
  ends those before any run starts, so then every project waits for it.
- Its variables need no credential lookup: the credential backends are
  slow to load and may need a key or a keyring service.
- Its program exists, and its `.env.local` can be written.

The others start once the daemon runs, which reports why a run cannot
start. Unlike the daemon's own runs, these start before their history row
is written: a daemon killed in between leaves no row for them, but the
next daemon finds their processes by their markers and ends them.

Nothing here imports trio.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from supervisor.config import Config, CredentialRef, ProjectConfig, SecretValue
from supervisor.control_socket import ControlSocket, open_control_socket
from supervisor.credential_file import take_key_environment
from supervisor.database import Database
from supervisor.env_file import remove_env_file, write_env_file
from supervisor.errors import CredentialError, SpawnError, StoreError
from supervisor.lockfile import LockHeld, take_lock
from supervisor.model import RunTrigger, TriggerMode
from supervisor.spawn import (
    DATA_DIR_VARIABLE,
    ProcessSpec,
    become_subreaper,
    find_processes,
    kill_run,
    resolve_argv,
    run_spec,
    runs_that_fit,
    spawn_leader,
)

DATABASE_NAME = "runvisor.db"
LOCK_NAME = "runvisor.lock"

# The signals the daemon acts on (see supervisor.daemon).
DAEMON_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Resources:
    """The resources a daemon keeps for its lifetime, taken before it starts
    any run."""

    control: ControlSocket
    data_lock: int
    key_environment: dict[str, str]
    """The variables that choose and unlock the credential backend, taken
    out of this process's environment so that runs never see them."""

    def close(self) -> None:
        self.control.close()
        if self.data_lock >= 0:
            os.close(self.data_lock)
            self.data_lock = -1


def take_resources(config: Config) -> Resources:
    """Create the data dir, listen on the control socket, and lock the data
    dir, in that order.

    A second daemon for the same socket or data dir stops here, before it
    could mark the runs of the first one lost or end them.

    Raises StoreError or ControlError with the fix.
    """
    data_dir = Path(config.runvisor.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise StoreError(
            f"Cannot create the data dir {str(data_dir)!r}: "
            f"{error.strerror or error}. Set [runvisor] data_dir to a "
            "writable folder."
        ) from None
    control = open_control_socket(Path(config.runvisor.socket))
    try:
        data_lock = lock_data_dir(data_dir)
    except BaseException:
        control.close()
        raise
    return Resources(control, data_lock, take_key_environment())


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's lock file for the daemon's lifetime; return its fd.

    Two daemons on one data dir would hand out the same run ids and end each
    other's runs at start-up. The lock goes with the process, even on
    SIGKILL.

    Raises StoreError when another daemon has the lock or the file cannot be
    opened.
    """
    path = data_dir / LOCK_NAME
    try:
        return take_lock(path)
    except LockHeld as held:
        raise StoreError(
            f"Another runvisor daemon (pid {held.holder}) is already using the "
            f"data dir {data_dir}. Stop it, or set another [runvisor] data_dir "
            "for this config."
        ) from None
    except OSError as error:
        raise StoreError(
            f"Cannot open the lock file {path}: {error.strerror or error}. Set "
            "[runvisor] data_dir to a writable folder."
        ) from None


@dataclass
class EarlyRun:
    """The leader of a project's first run, started before the event loop,
    with the reading ends of its output pipes."""

    project: ProjectConfig
    run_id: int
    spec: ProcessSpec
    variables: dict[str, str]
    secrets: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    stdout: int
    stderr: int
    started_at: datetime
    """Wall clock, UTC."""
    started_monotonic: float

    def end(self) -> None:
        """Kill the run's processes, reap its leader, and remove its
        `.env.local`: for a daemon that does not get to take it over."""
        kill_run(self.popen.pid, self.spec.markers)
        self.popen.wait()
        os.close(self.stdout)
        os.close(self.stderr)
        if not self.project.keep_env_file:
            remove_env_file(Path(self.project.path))


class KeptSignals:
    """SIGTERM, SIGINT and SIGHUP, kept for the daemon until it handles them
    itself: their default action would end this process, and leave the runs
    started before the event loop unsupervised."""

    def __init__(self) -> None:
        self.received: list[int] = []
        """The signals that arrived, in order."""
        self._previous = {
            daemon_signal: signal.signal(daemon_signal, self._keep)
            for daemon_signal in DAEMON_SIGNALS
        }

    def _keep(self, signum: int, _frame: object) -> None:
        self.received.append(signum)

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


@dataclass
class Boot:
    """The config, the resources and the early runs of a daemon that has
    not started yet. The daemon takes them over with `take`."""

    config: Config
    signals: KeptSignals
    resources: Resources | None = None
    database: Database | None = None
    """The history, opened already when its file existed."""
    runs: list[EarlyRun] = field(default_factory=list)

    def take(self) -> tuple[Resources, Database | None, list[EarlyRun]]:
        """Hand the resources, the history and the runs over to their new
        owner."""
        if self.resources is None:
            raise RuntimeError("the boot's resources were taken already")
        taken = (self.resources, self.database, self.runs)
        self.resources, self.database, self.runs = None, None, []
        return taken

    def close(self) -> None:
        """End whatever was not taken over, and give the daemon's signals
        back to their previous handlers."""
        for run in self.runs:
            run.end()
        self.runs = []
        if self.database is not None:
            self.database.close()
            self.database = None
        if self.resources is not None:
            self.resources.close()
            self.resources = None
        self.signals.restore()


def boot(config: Config, signals: KeptSignals | None = None) -> Boot:
    """Take the daemon's resources and start the first run of each
    always-running project that can start now.

    The daemon's signals are kept from here on, or from when `signals`
    began keeping them, until the daemon handles them itself.

    Raises StoreError or ControlError, as `take_resources` does, and
    StoreError when the history cannot be opened: no run starts then.
    """
    started = Boot(config, signals or KeptSignals())
    started.resources = take_resources(config)
    try:
        database_path = Path(config.runvisor.data_dir) / DATABASE_NAME
        # A new data dir gets its history from the daemon: creating the
        # schema imports sqlite-utils, which takes 35 ms.
        if database_path.exists():
            started.database = Database.open(database_path)
        started.runs = _start_runs(config, started.database)
    except BaseException:
        started.close()
        raise
    return started


def _start_runs(config: Config, database: Database | None) -> list[EarlyRun]:
    plain = {
        name: env
        for name, project in config.projects.items()
        if project.trigger == TriggerMode.ALWAYS_RUNNING
        and (env := _plain_env(project)) is not None
    }
    if not plain:
        return []

    data_dir = Path(config.runvisor.data_dir)
    if find_processes({DATA_DIR_VARIABLE: str(data_dir)}):
        return []  # left by an earlier daemon, which the daemon ends first
    last_id = 0 if database is None else database.max_run_id()

    become_subreaper()
    # Each run takes more descriptors once the daemon runs (its log, a
    # pidfd), so they are counted for it here, as for the daemon's runs.
    fit = runs_that_fit()
    if fit is not None:
        plain = dict(list(plain.items())[:fit])

    runs: list[EarlyRun] = []
    try:
        for name, (variables, secrets) in plain.items():
            run = _start_run(
                config.projects[name], variables, secrets, data_dir, last_id + 1
            )
            if run is not None:
                runs.append(run)
                last_id = run.run_id
    except BaseException:
        for run in runs:
            run.end()
        raise
    return runs


def _start_run(
    project: ProjectConfig,
    variables: dict[str, str],
    secrets: tuple[str, ...],
    data_dir: Path,
    run_id: int,
) -> EarlyRun | None:
    spec = run_spec(project, variables, data_dir, run_id, RunTrigger.STARTUP)
    try:
        argv = resolve_argv(spec)
        write_env_file(spec.cwd, variables)
    except (SpawnError, CredentialError, OSError):
        return None  # the daemon's own start of it reports why
    try:
        popen, stdout, stderr = spawn_leader(argv, spec)
    except SpawnError:
        if not project.keep_env_file:
            remove_env_file(spec.cwd)
        return None
    return EarlyRun(
        project=project,
        run_id=run_id,
        spec=spec,
        variables=variables,
        secrets=secrets,
        popen=popen,
        stdout=stdout,
        stderr=stderr,
        started_at=datetime.now(UTC),
        started_monotonic=time.monotonic(),
    )


def _plain_env(project: ProjectConfig) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """Return the project's variables and the secrets among them, or None
    when one of them maps a stored credential."""
    variables: dict[str, str] = {}
    secrets: list[str] = []
    for name, mapping in project.env.items():
        if isinstance(mapping, CredentialRef):
            return None
        if isinstance(mapping, SecretValue):
            secrets.append(mapping.value)
            variables[name] = mapping.value
        else:
            variables[name] = mapping
    return variables, tuple(secrets)
