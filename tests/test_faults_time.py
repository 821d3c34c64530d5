"""Wall-clock steps under the in-process daemon.

The daemon runs on trio's MockClock with a `TrioWallClock`, whose `jump`
steps the wall clock like an NTP correction or a resume from suspend. The
monotonic clock does not count a suspend, so a suspend is a forward step of
the wall clock alone. Promises:

- a forward step over many fire times runs one catch-up, for the latest,
  and the schedule then goes on every minute,
- a backward step never runs a fire time twice,
- backoff delays and run timeouts follow the monotonic clock, whatever the
  wall clock does.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import trio
from trio.testing import MockClock

from supervisor.model import (
    CompletedEvent,
    Event,
    ProjectState,
    RunRecord,
    RunStatus,
    RunTrigger,
    StartedEvent,
    StateEvent,
)

from .daemon_harness import WALL_BASE, Harness, running_daemon
from .helpers import write_script

MINUTE = timedelta(minutes=1)


def schedule_config(tmp_path: Path) -> str:
    write_script(tmp_path / "tick", "echo tick")
    return f"""
    [projects.tick]
    trigger = "schedule"
    path = "{tmp_path / "tick"}"
    cron = "* * * * *"
    timezone = "UTC"
    """


def fired(runs: list[RunRecord]) -> list[RunRecord]:
    """Runs that started for a fire time, oldest first."""
    return sorted(
        (run for run in runs if run.fire_time and run.status != RunStatus.SKIPPED),
        key=lambda run: run.id,
    )


async def test_forward_step_runs_one_catch_up(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    async with running_daemon(tmp_path, schedule_config(tmp_path)) as daemon:
        await daemon.wait_runs("tick", 2)
        daemon.wall.jump(10 * 60)
        runs = await daemon.wait_runs("tick", 5)
        await daemon.manager.stop("tick")
    runs = fired(runs)[:5]
    times = [run.fire_time for run in runs]
    assert times[:2] == [WALL_BASE + MINUTE, WALL_BASE + 2 * MINUTE]
    # The step lands between two fire times; the latest one passed fires
    # once, as a catch-up, and the schedule goes on from there.
    assert [run.trigger for run in runs] == [
        RunTrigger.SCHEDULE,
        RunTrigger.SCHEDULE,
        RunTrigger.CATCH_UP,
        RunTrigger.SCHEDULE,
        RunTrigger.SCHEDULE,
    ]
    assert times[2] is not None
    assert times[2] >= WALL_BASE + 12 * MINUTE
    assert times[3:] == [times[2] + MINUTE, times[2] + 2 * MINUTE]


async def test_backward_step_runs_no_fire_time_twice(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    async with running_daemon(tmp_path, schedule_config(tmp_path)) as daemon:
        await daemon.wait_runs("tick", 2)
        # Right after the fire of 12:02: back to 11:57, then a small step
        # back across the last fire time.
        daemon.wall.jump(-5 * 60)
        await daemon.wait_runs("tick", 3)
        daemon.wall.jump(-30)
        runs = await daemon.wait_runs("tick", 5)
        await daemon.manager.stop("tick")
    times = [run.fire_time for run in fired(runs)]
    assert len(times) == len(set(times))
    assert times[:5] == [WALL_BASE + minutes * MINUTE for minutes in range(1, 6)]


async def test_steps_both_ways_keep_fire_times_unique(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    # Backward steps stay within minutes: the daemon rechecks the wall clock
    # once a minute of monotonic time, so waiting out a step back of hours
    # would take hours of simulated time.
    steps = [3600, -300, 90, -45, 86400, -200, 600, -1]
    async with running_daemon(tmp_path, schedule_config(tmp_path)) as daemon:
        for count, step in enumerate(steps, start=1):
            await daemon.wait_runs("tick", count)
            daemon.wall.jump(step)
        runs = await daemon.wait_runs("tick", len(steps) + 2)
        await daemon.manager.stop("tick")
    times = [run.fire_time for run in fired(runs)]
    assert len(times) == len(set(times))
    assert times == sorted(times)  # type: ignore[type-var]


class Timeline:
    """Trio times of one project's events, recorded as they are published."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: list[tuple[float, Event]] = []
        self._changed = trio.Event()

    async def follow(
        self, harness: Harness, task_status: trio.TaskStatus[None]
    ) -> None:
        def mine(event: Event) -> bool:
            return getattr(event, "project", None) == self.name

        with harness.daemon.hub.subscribe(10_000, where=mine) as subscription:
            task_status.started()
            while True:
                event = await subscription.receive()
                if isinstance(event, StartedEvent | CompletedEvent | StateEvent):
                    self.entries.append((trio.current_time(), event))
                    self._changed.set()
                    self._changed = trio.Event()

    def times(self, kind: type) -> list[float]:
        return [at for at, event in self.entries if isinstance(event, kind)]

    def backoff_times(self) -> list[float]:
        return [
            at
            for at, event in self.entries
            if isinstance(event, StateEvent) and event.new == ProjectState.BACKOFF
        ]

    async def wait(self, kind: type, count: int) -> None:
        """Wait until `count` events of `kind` were recorded."""
        while len(self.times(kind)) < count:
            await self._changed.wait()

    async def wait_backoffs(self, count: int) -> None:
        while len(self.backoff_times()) < count:
            await self._changed.wait()


async def test_backoff_ignores_wall_clock_steps(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "flaky"
    # Waits for the test to subscribe before its first exit.
    write_script(folder, "while [ ! -e go ]; do sleep 0.02; done\nexit 1")
    config = f"""
    [projects.flaky]
    trigger = "always_running"
    path = "{folder}"
    restart = "always"
    start_seconds = 0
    max_retries = 100
    restart_limit = 100
    backoff = {{ initial = "30s", factor = 2, max = "120s", reset_after = "1h" }}
    """
    timeline = Timeline("flaky")
    steps = [7200, -7200, 86400, -3 * 86400]
    async with (
        running_daemon(tmp_path, config) as daemon,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(timeline.follow, daemon)
        (folder / "go").touch()
        for count, step in enumerate(steps, start=1):
            # Step the wall clock while the project waits in backoff.
            await timeline.wait_backoffs(count)
            daemon.wall.jump(step)
        await timeline.wait_backoffs(len(steps) + 1)
        await daemon.manager.stop("flaky")
        nursery.cancel_scope.cancel()
    starts = timeline.times(StartedEvent)
    delays = []
    for backoff in timeline.backoff_times()[: len(steps)]:
        next_start = min(start for start in starts if start > backoff)
        delays.append(round(next_start - backoff))
    assert delays == [30, 60, 120, 120]


async def test_timeout_ignores_wall_clock_steps(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path / "slow", "exec -a fault-slow sleep 1000")
    config = f"""
    [projects.slow]
    trigger = "manual"
    path = "{tmp_path / "slow"}"
    timeout = "60s"
    stop_timeout = "1s"
    """
    timeline = Timeline("slow")
    async with (
        running_daemon(tmp_path, config) as daemon,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(timeline.follow, daemon)
        for count, step in enumerate([86400, -86400, 3600], start=1):
            daemon.manager.trigger("slow")
            await timeline.wait(StartedEvent, count)
            daemon.wall.jump(step)
            await timeline.wait(CompletedEvent, count)
        runs = await daemon.history("slow")
        nursery.cancel_scope.cancel()
    lasted = [
        round(end - start)
        for start, end in zip(
            timeline.times(StartedEvent), timeline.times(CompletedEvent), strict=True
        )
    ]
    assert lasted == [60, 60, 60]
    assert {run.status for run in runs} == {RunStatus.TIMED_OUT}
    for earlier, later in itertools.pairwise(sorted(runs, key=lambda run: run.id)):
        assert earlier.id < later.id
