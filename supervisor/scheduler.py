"""The loop that fires a schedule on time, and the wall clocks it reads.

The fire times themselves come from `supervisor.cron`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import trio

from . import cron, model
from .cron import ONE_MINUTE, CronSchedule, to_utc

logger = logging.getLogger(__name__)

# Maximum wait of one sleep of the schedule loop, so that a step of the wall
# clock (NTP, suspend, manual change) is noticed within this many seconds.
_MAX_SLEEP = 60.0


class WallClock(Protocol):
    """Source of wall-clock time, injected so that tests can move it."""

    def now(self) -> datetime:
        """Return the current time as an aware UTC datetime."""
        ...


class SystemClock:
    """The operating system's wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class TrioWallClock:
    """A wall clock driven by trio's clock, for tests and simulations.

    It reads `base` at the moment it is created (or first read, when created
    outside trio) and then advances with `trio.current_time()`, so trio's
    `MockClock` moves it too. `jump` steps it like an NTP correction or a
    suspend would.
    """

    def __init__(self, base: datetime) -> None:
        self._base = to_utc(base)
        self._step = 0.0
        self._origin: float | None
        try:
            self._origin = trio.current_time()
        except RuntimeError:
            self._origin = None

    def now(self) -> datetime:
        if self._origin is None:
            self._origin = trio.current_time()
        elapsed = trio.current_time() - self._origin + self._step
        return self._base + timedelta(seconds=elapsed)

    def jump(self, seconds: float) -> None:
        """Step the clock by `seconds`, forward when positive, back when negative."""
        self._step += seconds


class FireTarget(Protocol):
    """The receiver of a schedule's fires, such as the runner of a project."""

    def fire(self, fire_time: datetime, trigger: model.RunTrigger) -> None:
        """Start a run for `fire_time` (UTC). Must not block: the overlap policy
        is applied by the target."""
        ...


async def run_schedule(
    schedule: CronSchedule,
    target: FireTarget,
    clock: WallClock,
    *,
    last_fire: datetime | None,
    catch_up: bool,
    jitter: float = 0.0,
    rng: random.Random | None = None,
    on_next: Callable[[datetime | None], None] | None = None,
    prepare: Callable[[datetime], None] | None = None,
    prestart: float = 0.0,
    name: str = "",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fire `target` at each fire time of `schedule` until cancelled.

    `last_fire` is the latest fire time already handled (from run history).
    No fire time at or before it fires again. With `catch_up`, the latest fire
    time missed since `last_fire` fires once at start-up, as a CATCH_UP run,
    without jitter. When the wall clock steps forward over several fire times,
    only the latest fires, as a CATCH_UP run. When it steps back, nothing
    fires until it passes the last fire time again.

    Each fire waits a further uniform(0, `jitter`) seconds, but the fire time
    passed on stays the nominal one. `on_next` receives each next fire time
    (None if the schedule has none left, which ends the loop). While a fire
    waits for its jitter, `on_next` receives the time the wait ends, so that
    a status shows when the run starts rather than a fire time already past.
    Fire times given to `target` and `on_next` are UTC. `name` labels log lines (the
    expression when empty).

    `prepare` receives each fire time `prestart` seconds ahead of it (or at
    once, when less is left), so the target can start its run early and
    hold it until the fire. Fires with jitter and catch-up fires are not
    prepared.
    """
    if jitter < 0:
        raise ValueError(f"jitter must be 0 or more seconds, not {jitter}")
    if prestart < 0:
        raise ValueError(f"prestart must be 0 or more seconds, not {prestart}")
    if jitter > 0 or prestart == 0:
        prepare = None
    lead = timedelta(seconds=prestart)
    rng = rng if rng is not None else random.Random()
    name = name or schedule.expression
    now = clock.now()
    handled = None if last_fire is None else to_utc(last_fire)

    if catch_up and handled is not None:
        missed = schedule._latest_between(handled, now)
        if missed is not None:
            logger.info("catching up: schedule=%s fire_time=%s", name, missed)
            target.fire(missed, model.RunTrigger.CATCH_UP)
            handled = missed

    while True:
        after = now if handled is None else max(now, handled)
        if handled is not None and handled <= now < handled + ONE_MINUTE:
            # Fire times are at least a minute apart, so none lies in
            # (handled, now]. Searching after `handled` finds the same next
            # fire time, and lets the schedules that fired together share it.
            after = handled
        next_fire = cron.next_fire(schedule, after)
        if on_next is not None:
            on_next(next_fire)
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        if next_fire is None:
            logger.error("no fire time left: schedule=%s after=%s", name, after)
            return
        logger.debug("next fire: schedule=%s fire_time=%s", name, next_fire)

        now = clock.now()
        prepared = prepare is None
        while now < next_fire:
            wake_at = next_fire
            if not prepared:
                if now >= next_fire - lead:
                    prepared = True
                    assert prepare is not None
                    prepare(next_fire)
                else:
                    wake_at = next_fire - lead
            await trio.sleep(min(_MAX_SLEEP, (wake_at - now).total_seconds()))
            now = clock.now()

        # `now` may be far past `next_fire` after a forward step of the clock.
        # Fire times are at least a minute apart, so within a minute of
        # `next_fire` no later one can have passed. Skipping the search then
        # spares a busy minute boundary one search per schedule.
        fire_time = next_fire
        if now - next_fire >= ONE_MINUTE:
            fire_time = schedule._latest_between(after, now) or next_fire
        trigger = model.RunTrigger.SCHEDULE
        if fire_time != next_fire:
            trigger = model.RunTrigger.CATCH_UP
            logger.warning(
                "clock jumped: schedule=%s skipped fire times %s to %s, "
                "firing once for the latest",
                name,
                next_fire,
                fire_time,
            )
        handled = fire_time
        if jitter > 0:
            delay = rng.uniform(0, jitter)
            if on_next is not None:
                on_next(clock.now() + timedelta(seconds=delay))
            await trio.sleep(delay)
        target.fire(fire_time, trigger)
        # Let the run start before the next fire time is computed: at a
        # boundary where many schedules fire, the runs go first.
        await trio.lowlevel.checkpoint()
