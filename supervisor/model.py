"""States, run records and events shared by every module.

This module imports nothing else from the package, so any module can use it
without creating an import cycle. Timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec


class TriggerMode(enum.StrEnum):
    """Trigger mode: the way a project's runs are started."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    ALWAYS_RUNNING = "always_running"


class ProjectState(enum.StrEnum):
    """Lifecycle state of a project, in the vocabulary of supervisord."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"
    SCHEDULED = "scheduled"


class RunTrigger(enum.StrEnum):
    """Cause of a run."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    RESTART = "restart"
    STARTUP = "startup"
    CATCH_UP = "catch_up"


class RunStatus(enum.StrEnum):
    """Outcome of a run. Every status but RUNNING is final."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    LOST = "lost"


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Stream(enum.StrEnum):
    OUT = "out"
    ERR = "err"


class RestartPolicy(enum.StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class OverlapPolicy(enum.StrEnum):
    """Policy for a fire or trigger that comes while the previous run is going."""

    SKIP = "skip"
    QUEUE = "queue"
    REPLACE = "replace"
    ALLOW = "allow"


class OnUnhealthy(enum.StrEnum):
    RESTART = "restart"
    NONE = "none"


class RunRecord(msgspec.Struct, kw_only=True):
    """One row of run history.

    `fire_time` is the cron fire time a scheduled or catch-up run belongs to;
    the scheduler reads the latest one back at start-up so that no fire time
    runs twice across daemon restarts.
    """

    id: int
    project: str
    trigger: RunTrigger
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    fire_time: datetime | None = None


class RunEvent(msgspec.Struct, kw_only=True):
    """A row of the run events table: state changes, skipped fires, restarts,
    give-ups and health changes, each tied to a project and maybe a run."""

    project: str
    kind: str
    at: datetime
    run_id: int | None = None
    detail: str = ""


class CredentialInfo(msgspec.Struct, kw_only=True):
    """A row of the credential index. The secret itself lives only in the
    credential backend."""

    nickname: str
    description: str
    created_at: datetime
    updated_at: datetime


# Live events, pushed to subscribers of the control socket. The tag is the
# event name that `runvisor events` prints.


class StartedEvent(msgspec.Struct, tag="started", kw_only=True):
    project: str
    run_id: int
    trigger: RunTrigger
    pid: int | None
    at: datetime


class CompletedEvent(msgspec.Struct, tag="completed", kw_only=True):
    project: str
    run_id: int
    status: RunStatus
    exit_code: int | None
    signal: int | None
    reason: str
    at: datetime


class LogEvent(msgspec.Struct, tag="log", kw_only=True):
    project: str
    run_id: int
    stream: Stream
    text: str
    at: datetime


class StateEvent(msgspec.Struct, tag="state", kw_only=True):
    project: str
    old: ProjectState
    new: ProjectState
    reason: str
    at: datetime


class HealthEvent(msgspec.Struct, tag="health", kw_only=True):
    project: str
    run_id: int
    old: Health
    new: Health
    reason: str
    at: datetime


class ReloadEvent(msgspec.Struct, tag="reload", kw_only=True):
    ok: bool
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    error: str
    at: datetime


Event = (
    StartedEvent | CompletedEvent | LogEvent | StateEvent | HealthEvent | ReloadEvent
)


class ProjectStatus(msgspec.Struct, kw_only=True):
    """Snapshot of one project for `status`."""

    name: str
    trigger: TriggerMode
    state: ProjectState
    reason: str = ""
    health: Health = Health.UNKNOWN
    last_probe_at: datetime | None = None
    pid: int | None = None
    run_id: int | None = None
    started_at: datetime | None = None
    restarts: int = 0
    last_run: RunRecord | None = None
    next_fire: datetime | None = None
    has_probe: bool = False
    """Whether the project has a health probe; without one `health` stays
    unknown."""
