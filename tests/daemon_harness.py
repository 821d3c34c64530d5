"""Run a real daemon in the test's trio run, on a config written by the test.

The daemon is the real one (real store file, real child processes); only
time is simulated: trio's MockClock drives durations, and the wall clock is
`TrioWallClock`, so cron fire times follow the same simulated time.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import trio

from supervisor.daemon import Daemon
from supervisor.logs import read_run_log, run_log_path
from supervisor.model import ProjectState, RunRecord, RunStatus
from supervisor.scheduler import TrioWallClock

REAL_TIMEOUT = 20.0
# Simulated seconds between re-checks of a condition that no live event
# announces (a marker process appearing, a file written by a child).
RECHECK_SECONDS = 30.0

# Wall-clock instant that simulated time 0 maps to: a minute boundary.
WALL_BASE = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


@dataclass
class Harness:
    daemon: Daemon
    config_path: Path
    wall: TrioWallClock
    events: list[object] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def manager(self):  # type: ignore[no-untyped-def]
        assert self.daemon.manager is not None
        return self.daemon.manager

    def state(self, name: str) -> ProjectState:
        return self.manager.runner(name).state

    def pid(self, name: str) -> int | None:
        return self.manager.runner(name).status().pid

    async def history(
        self, name: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        assert self.daemon.store is not None
        await self.daemon.store.flush()
        return await self.daemon.store.history(name, limit=limit)

    def log_lines(self, name: str, run_id: int) -> list[tuple[str, str]]:
        path = run_log_path(self.daemon.data_dir / "logs", name, run_id)
        return [(str(record.stream), record.text) for record in read_run_log(path)]

    def write_config(self, text: str, *, header: bool = True) -> None:
        prefix = data_header(self.config_path.parent) if header else ""
        self.config_path.write_text(prefix + textwrap.dedent(text))

    async def wait_for(
        self, condition: Callable[[], bool], timeout: float = REAL_TIMEOUT
    ) -> None:
        """Wait until `condition()` holds, re-checking at every live event.

        The timeout is in real seconds: a deadline on the simulated clock
        would be jumped to while a real child process is still working.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            changed = self._changed
            with trio.move_on_after(RECHECK_SECONDS):
                await changed.wait()

    async def wait_state(
        self, name: str, *states: ProjectState, timeout: float = REAL_TIMEOUT
    ) -> None:
        await self.wait_for(lambda: self.state(name) in states, timeout)

    async def wait_runs(
        self, name: str, count: int, *, timeout: float = REAL_TIMEOUT
    ) -> list[RunRecord]:
        """Wait until `name` has at least `count` finished runs; return all
        its runs, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            runs = await self.history(name)
            if len([run for run in runs if run.status != RunStatus.RUNNING]) >= count:
                return sorted(runs, key=lambda run: run.id)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name}: fewer than {count} finished runs: {runs}"
                )
            changed = self._changed
            with trio.move_on_after(RECHECK_SECONDS):
                await changed.wait()

    async def follow_events(self, task_status: trio.TaskStatus[None]) -> None:
        with self.daemon.hub.subscribe(max_queue=100_000) as subscription:
            task_status.started()
            while True:
                event = await subscription.receive()
                self.events.append(event)
                self._changed.set()
                self._changed = trio.Event()


def data_header(tmp_path: Path) -> str:
    return (
        f'[runvisor]\ndata_dir = "{tmp_path / "data"}"\n'
        f'socket = "{tmp_path / "control.sock"}"\n'
    )


@asynccontextmanager
async def running_daemon(
    tmp_path: Path, config_text: str, *, wall_base: datetime = WALL_BASE
) -> AsyncIterator[Harness]:
    config_path = tmp_path / "runvisor.toml"
    config_path.write_text(data_header(tmp_path) + textwrap.dedent(config_text))
    wall = TrioWallClock(wall_base)
    daemon = Daemon(config_path, clock=wall)
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as inner:
            await inner.start(daemon.serve)
            harness = Harness(daemon=daemon, config_path=config_path, wall=wall)
            await outer.start(harness.follow_events)
            try:
                yield harness
            finally:
                daemon.request_shutdown()
        outer.cancel_scope.cancel()
