"""Restart, backoff and start-success rules of always-running projects.

Pure logic over numbers: no trio, no processes, so every rule is testable
with plain calls. Times are seconds of a monotonic clock.

- A run that exits with a success code (and was not restarted for health) is
  never a failed start, however short it lived.
- Any other exit before `start_seconds` is a failed start. More than
  `max_retries` failed starts in a row give up.
- More than `restart_limit` restarts within `restart_window`, whatever the
  uptime of each run, give up.
- The backoff delay grows from `initial` by `factor` up to `max`, and goes
  back to `initial` once a run has been up for `reset_after`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from supervisor.config import ProjectConfig, format_duration
from supervisor.model import RestartPolicy


class Action(enum.Enum):
    RESTART = "restart"
    EXIT = "exit"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float
    reason: str
    success: bool
    failed_start: bool


class RestartTracker:
    """Counts failures and restarts of one project and decides what follows
    each exit."""

    def __init__(self, project: ProjectConfig) -> None:
        self.project = project
        self.restarts = 0
        self.failed_starts = 0
        self._step = 0
        self._restart_times: deque[float] = deque()

    def reset(self) -> None:
        """Forget failures, as after a person starts the project again."""
        self.failed_starts = 0
        self._step = 0
        self._restart_times.clear()

    def is_success(self, exit_code: int | None, signal: int | None) -> bool:
        return signal is None and exit_code in self.project.success_exit_codes

    def on_exit(
        self,
        *,
        exit_code: int | None,
        signal: int | None,
        uptime: float,
        now: float,
        health_failure: bool = False,
    ) -> Decision:
        """Decide what follows an exit that no person asked for."""
        project = self.project
        success = self.is_success(exit_code, signal) and not health_failure
        failed_start = not success and uptime < project.start_seconds

        if uptime >= project.backoff.reset_after:
            self._step = 0
        if failed_start:
            self.failed_starts += 1
        else:
            self.failed_starts = 0

        if project.restart == RestartPolicy.NEVER and not health_failure:
            return Decision(Action.EXIT, 0.0, "restart = never", success, failed_start)
        if project.restart == RestartPolicy.ON_FAILURE and success:
            return Decision(
                Action.EXIT,
                0.0,
                "exited with a success code (restart = on-failure)",
                success,
                failed_start,
            )

        if self.failed_starts > project.max_retries:
            return Decision(
                Action.GIVE_UP,
                0.0,
                f"gave up after {self.failed_starts} failed starts in a row "
                f"(max_retries = {project.max_retries}): each run exited within "
                f"start_seconds = {format_duration(project.start_seconds)}",
                success,
                failed_start,
            )

        window_start = now - project.restart_window
        while self._restart_times and self._restart_times[0] <= window_start:
            self._restart_times.popleft()
        if len(self._restart_times) >= project.restart_limit:
            return Decision(
                Action.GIVE_UP,
                0.0,
                f"gave up: restart_limit = {project.restart_limit} restarts within "
                f"restart_window = {format_duration(project.restart_window)} reached",
                success,
                failed_start,
            )

        self._restart_times.append(now)
        self.restarts += 1
        delay = self.next_delay()
        return Decision(Action.RESTART, delay, "", success, failed_start)

    def next_delay(self) -> float:
        backoff = self.project.backoff
        delay = min(backoff.initial * backoff.factor**self._step, backoff.max)
        if delay < backoff.max:
            self._step += 1
        return delay
