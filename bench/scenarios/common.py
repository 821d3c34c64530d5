"""Pieces every scenario uses: a peer session with cleanup, and start tracking."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench import procs
from bench.peers.base import Peer, Project, Start, Workspace, read_starts

logger = logging.getLogger(__name__)

Metrics = dict[str, float]


@contextmanager
def session(peer_cls: type[Peer], label: str) -> Iterator[tuple[Workspace, Peer]]:
    """Yield a fresh workspace and adapter; afterwards stop the daemon, kill
    whatever the run left behind by pid, and remove the folder."""
    ws = Workspace(f"{label}-{peer_cls.name}")
    peer = peer_cls(ws)
    try:
        yield ws, peer
    finally:
        peer.cleanup()
        left = ws.sweep()
        if left:
            logger.warning(
                "%s %s: killed %d leftover processes after the run",
                peer_cls.name,
                label,
                left,
            )
        ws.remove()


def sleep_child(ws: Workspace, project: str) -> str:
    """Return a script body that becomes a marked, idle `sleep`."""
    return f"exec -a {ws.child_name(project)} sleep 100000"


def latest_live_start(project: Project, since: float) -> Start | None:
    """Return the project's newest start after `since` if its pid still runs."""
    starts = [s for s in read_starts(project) if s.at >= since]
    if starts and procs.is_alive(starts[-1].pid):
        return starts[-1]
    return None


def wait_all_started(
    projects: list[Project], since: float, timeout: float
) -> list[Start]:
    """Wait until every project has a live run started after `since`."""

    def check() -> list[Start] | None:
        found = []
        for project in projects:
            start = latest_live_start(project, since)
            if start is None:
                return None
            found.append(start)
        return found

    if not projects:
        return []
    return procs.wait_for(check, timeout, f"{len(projects)} projects to start", 0.05)


def project_pids(ws: Workspace) -> list[int]:
    """Return live project processes: the scripts and their marked children."""
    return [
        pid
        for pid in procs.marked_pids(ws.marker)
        if f"{ws.root}/projects/".encode() in procs.cmdline(pid)
        or f"{ws.marker}:".encode() in procs.cmdline(pid)
    ]


def percentile(values: list[float], q: float) -> float:
    """Return the `q` quantile (0..1) of `values` by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def wall_times(peer: Peer, argv: list[str], runs: int) -> list[float]:
    """Run a CLI command `runs` times; return the wall seconds of each."""
    times = []
    for _ in range(runs):
        result = peer.run_cli(argv, timeout=120, check=False)
        if result.returncode not in (
            0,
            3,
        ):  # supervisorctl exits 3 when a program is stopped
            raise RuntimeError(
                f"{' '.join(argv)} exited with {result.returncode}: "
                f"{result.stderr.strip()}"
            )
        times.append(result.seconds)
    return times


def settle(seconds: float) -> None:
    time.sleep(seconds)
