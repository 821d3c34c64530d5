"""The one interface every process manager is driven through.

A scenario builds a `Workspace`, adds projects to it, writes the peer's
config, starts its daemon, and reads back what it needs. Each peer adapter
turns the same projects and `Settings` into its own config format and CLI.
"""

from __future__ import annotations

import abc
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from bench import procs

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"

logger = logging.getLogger(__name__)

Trigger = Literal["always_running", "schedule", "manual"]


class PeerMissing(Exception):
    """The peer is not installed, or lacks a feature a scenario needs."""


@dataclass(frozen=True)
class Project:
    """One project: a folder with a `run.sh`, and how it is started."""

    name: str
    folder: Path
    trigger: Trigger = "always_running"
    restart: bool = True
    cron: str | None = None

    @property
    def script(self) -> Path:
        return self.folder / "run.sh"

    @property
    def starts_log(self) -> Path:
        return self.folder / "starts.log"


@dataclass(frozen=True)
class Settings:
    """Settings given to every peer in the same way.

    `fast_restart` requests each peer's smallest restart delay.
    """

    start_seconds: float = 1.0
    stop_timeout: float = 2.0
    fast_restart: bool = False


@dataclass
class Start:
    pid: int
    at: float


class Workspace:
    """A temporary folder with one benchmark run's projects and peer state.

    Its marker (`rvbench-<hex>`) is in the folder's path, in the environment
    of every process started from here, and in the `exec -a` names of the
    children, so `sweep()` finds everything this run left behind.
    """

    def __init__(self, label: str) -> None:
        self.marker = f"rvbench-{secrets.token_hex(4)}"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.marker}-{label}-"))
        self.projects: list[Project] = []
        (self.root / "projects").mkdir()
        (self.root / "logs").mkdir()

    def env(self) -> dict[str, str]:
        """Return the environment for daemons and CLI commands of this run."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        }
        env[procs.MARKER_ENV] = self.marker
        env["TMPDIR"] = str(self.root)
        return env

    def add_project(
        self,
        name: str,
        body: str,
        trigger: Trigger = "always_running",
        restart: bool = True,
        cron: str | None = None,
    ) -> Project:
        """Create a project folder whose `run.sh` records its start, then runs `body`.

        The start line is `<pid> <epoch seconds>`, written by bash itself
        (`$EPOCHREALTIME`, no fork), so start times do not depend on how
        often the benchmark polls.
        """
        folder = self.root / "projects" / name
        folder.mkdir()
        project = Project(name, folder, trigger, restart, cron)
        project.script.write_text(
            "#!/usr/bin/env bash\n"
            f"printf '%s %s\\n' \"$$\" \"$EPOCHREALTIME\" >> '{project.starts_log}'\n"
            f"{body}\n"
        )
        project.script.chmod(0o755)
        self.projects.append(project)
        return project

    def child_name(self, project: str, role: str = "child") -> str:
        """Return the argv[0] for an `exec -a` inside a project's script."""
        return f"{self.marker}:{role}:{project}"

    def sweep(self) -> int:
        """Kill what this run left running; return how many processes that was."""
        return procs.sweep(self.marker)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def read_starts(project: Project) -> list[Start]:
    """Return every start a project's script recorded, oldest first."""
    try:
        text = project.starts_log.read_text()
    except FileNotFoundError:
        return []
    starts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            starts.append(Start(int(parts[0]), float(parts[1])))
    return starts


class Peer(abc.ABC):
    """A process manager driven by the benchmark.

    An adapter drives at most one daemon at a time. Every method is bounded in
    time and raises `procs.BenchTimeout` or `RuntimeError` when the peer does
    not do what was requested.
    """

    name: ClassVar[str]
    # The processes that the RSS and CPU figures of `daemon_pids()` count.
    counted: ClassVar[str]
    # Optional features a scenario may need and a peer may lack:
    # "schedule" (starts at cron fire times).
    features: ClassVar[frozenset[str]] = frozenset()
    OPTIONAL_FEATURES: ClassVar[frozenset[str]] = frozenset({"schedule"})

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.env = workspace.env()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.settings = Settings()
        self.projects: list[Project] = []

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """Return the installed version; raise PeerMissing when it is not installed."""

    @classmethod
    def missing_feature(cls, feature: str) -> str | None:
        """Return why a scenario feature cannot run on this peer, or None."""
        if feature not in cls.OPTIONAL_FEATURES or feature in cls.features:
            return None
        return f"{cls.name} has no {feature} feature"

    @abc.abstractmethod
    def write_config(self, projects: list[Project], settings: Settings) -> None:
        """Write the peer's config for `projects` into the workspace."""

    @abc.abstractmethod
    def start_daemon(self) -> None:
        """Start the daemon (which starts always-running projects); wait until
        its control interface responds."""

    @abc.abstractmethod
    def daemon_pids(self) -> list[int]:
        """Return the pids whose RSS and CPU count as the daemon's."""

    @abc.abstractmethod
    def stop_projects(self, names: list[str]) -> None:
        """Request a stop of `names`, the way a user stops several projects."""

    @abc.abstractmethod
    def start_projects(self, names: list[str]) -> None:
        """Request a start of `names` (stopped always-running projects)."""

    @abc.abstractmethod
    def status(self) -> dict[str, str]:
        """Return each project's state, as `running` or the peer's own word."""

    @abc.abstractmethod
    def status_argv(self, as_json: bool = False) -> list[str]:
        """Return the CLI command that prints the status of every project."""

    @abc.abstractmethod
    def roundtrip_argv(self, count: int) -> list[str]:
        """Return a command that makes `count` status requests in one process
        and prints a JSON list of their durations in seconds."""

    @abc.abstractmethod
    def log_files(self, project: str) -> list[Path]:
        """Return the files holding a project's captured stdout, oldest first."""

    @abc.abstractmethod
    def request_shutdown(self) -> None:
        """Ask the daemon to stop every project and exit; return at once."""

    def daemon_running(self) -> bool:
        return any(procs.is_alive(pid) for pid in self.daemon_pids())

    def shutdown(self, timeout: float = 30.0) -> float:
        """Shut the daemon down gracefully; return the seconds it took.

        Kills the daemon by pid when it outlives `timeout`.
        """
        pids = self.daemon_pids()
        start = time.perf_counter()
        self.request_shutdown()
        try:
            procs.wait_for(
                lambda: not any(procs.is_alive(pid) for pid in pids),
                timeout,
                f"{self.name} to exit",
            )
        finally:
            for pid in pids:
                procs.kill_pid(pid, self.ws.marker)
            if self.daemon is not None:
                procs.stop_popen(self.daemon, timeout=5)
        return time.perf_counter() - start

    def cleanup(self) -> None:
        """End the daemon if it still runs; never raises."""
        try:
            if self.daemon_running():
                self.shutdown(timeout=10)
        except Exception as e:
            # The sweep that follows kills whatever this left running.
            logger.warning("%s: graceful shutdown failed: %s", self.name, e)
        if self.daemon is not None and self.daemon.poll() is None:
            procs.stop_popen(self.daemon, timeout=5)

    def run_cli(
        self, argv: list[str], timeout: float = 60.0, check: bool = True
    ) -> procs.CommandResult:
        return procs.run_command(argv, self.env, timeout, cwd=self.ws.root, check=check)

    def all_running(self, names: list[str]) -> bool:
        states = self.status()
        return all(states.get(name) == "running" for name in names)


def bench_python() -> str:
    """Return the Python that runs helper scripts needing only the stdlib."""
    return sys.executable


def peers_python() -> Path:
    return PEERS_DIR / "venv" / "bin" / "python"
