"""Restart, backoff and give-up rules, as plain calls."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config import Backoff, ProjectConfig
from supervisor.model import RestartPolicy, TriggerMode
from supervisor.policy import Action, RestartTracker


def make_project(**overrides: Any) -> ProjectConfig:
    settings: dict[str, Any] = {
        "name": "app",
        "path": "/tmp/app",
        "trigger": TriggerMode.ALWAYS_RUNNING,
    }
    settings.update(overrides)
    return ProjectConfig(**settings)


def test_failing_fast_with_zero_start_seconds_hits_restart_limit() -> None:
    project = make_project(
        restart=RestartPolicy.ON_FAILURE,
        start_seconds=0.0,
        restart_limit=3,
        restart_window=60.0,
        backoff=Backoff(initial=0.2, factor=2.0, max=60.0, reset_after=60.0),
    )
    tracker = RestartTracker(project)
    actions = []
    now = 0.0
    for _ in range(4):
        decision = tracker.on_exit(exit_code=3, signal=None, uptime=0.01, now=now)
        actions.append(decision.action)
        now += decision.delay + 0.01
    assert actions == [Action.RESTART, Action.RESTART, Action.RESTART, Action.GIVE_UP]
    assert "restart_limit = 3" in decision.reason
    assert tracker.restarts == 3


def test_clean_exit_is_not_restarted_on_failure_policy() -> None:
    tracker = RestartTracker(
        make_project(restart=RestartPolicy.ON_FAILURE, start_seconds=5.0)
    )
    decision = tracker.on_exit(exit_code=0, signal=None, uptime=0.01, now=0.0)
    assert decision.action == Action.EXIT
    assert decision.success
    assert not decision.failed_start


def test_clean_fast_exit_is_not_a_failed_start() -> None:
    tracker = RestartTracker(make_project(start_seconds=5.0, max_retries=0))
    decision = tracker.on_exit(exit_code=0, signal=None, uptime=0.01, now=0.0)
    assert decision.action == Action.RESTART
    assert not decision.failed_start


def test_failed_starts_give_up_after_max_retries() -> None:
    tracker = RestartTracker(make_project(start_seconds=1.0, max_retries=2))
    actions = [
        tracker.on_exit(exit_code=1, signal=None, uptime=0.1, now=float(i)).action
        for i in range(3)
    ]
    assert actions == [Action.RESTART, Action.RESTART, Action.GIVE_UP]
    assert tracker.failed_starts == 3


def test_long_run_resets_failed_start_count() -> None:
    tracker = RestartTracker(make_project(start_seconds=1.0, max_retries=1))
    tracker.on_exit(exit_code=1, signal=None, uptime=0.1, now=0.0)
    tracker.on_exit(exit_code=1, signal=None, uptime=30.0, now=40.0)
    decision = tracker.on_exit(exit_code=1, signal=None, uptime=0.1, now=80.0)
    assert decision.action == Action.RESTART


def test_backoff_grows_caps_and_resets_after_stable_run() -> None:
    project = make_project(
        restart=RestartPolicy.ALWAYS,
        max_retries=100,
        restart_limit=100,
        backoff=Backoff(initial=1.0, factor=2.0, max=8.0, reset_after=10.0),
    )
    tracker = RestartTracker(project)
    uptimes = [0.1, 0.1, 0.1, 15.0, 0.1, 0.1, 0.1, 0.1, 0.1]
    delays = []
    now = 0.0
    for uptime in uptimes:
        now += uptime
        decision = tracker.on_exit(exit_code=1, signal=None, uptime=uptime, now=now)
        delays.append(decision.delay)
        now += decision.delay
    assert delays == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_never_policy_exits_but_health_failure_restarts() -> None:
    tracker = RestartTracker(make_project(restart=RestartPolicy.NEVER))
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=5.0, now=0.0).action
        == Action.EXIT
    )
    decision = tracker.on_exit(
        exit_code=None, signal=15, uptime=5.0, now=1.0, health_failure=True
    )
    assert decision.action == Action.RESTART
    assert not decision.success


@pytest.mark.parametrize(
    ("exit_code", "signal", "expected"),
    [(0, None, True), (3, None, True), (1, None, False), (None, 9, False)],
)
def test_success_exit_codes(
    exit_code: int | None, signal: int | None, expected: bool
) -> None:
    tracker = RestartTracker(make_project(success_exit_codes=(0, 3)))
    assert tracker.is_success(exit_code, signal) is expected


def test_restart_window_forgets_old_restarts() -> None:
    tracker = RestartTracker(
        make_project(restart_limit=2, restart_window=10.0, start_seconds=0.0)
    )
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=5, now=0.0).action
        == Action.RESTART
    )
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=5, now=5.0).action
        == Action.RESTART
    )
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=5, now=20.0).action
        == Action.RESTART
    )
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=1, now=21.0).action
        == Action.RESTART
    )
    assert (
        tracker.on_exit(exit_code=1, signal=None, uptime=1, now=22.0).action
        == Action.GIVE_UP
    )
