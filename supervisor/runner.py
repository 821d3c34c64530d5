"""One project's lifecycle in each trigger mode.

A `ProjectRunner` owns everything about one project: its state, its active
runs and its restart tracker. Its `run` task is the parent of every run of
the project, so cancelling that task stops them all. Every state change
happens in this task tree, so no lock guards the state.

- manual: a run starts on `trigger`; a trigger while a run is going follows
  the `overlap` policy.
- schedule: the cron loop of `scheduler.run_schedule` calls `fire`, which
  follows the same overlap policy.
- always_running: a supervise loop starts the run. After each exit, the
  restart tracker decides whether to restart it, after which backoff delay,
  or to give up.

A stop requested by a person sets the run's `stop_reason` before cancelling
its scope, so the exit it causes is recorded as `stopped` and never reaches
the restart policy.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import trio

from supervisor.config import DaemonSettings, ProjectConfig, format_duration
from supervisor.credentials import CredentialLookup, ResolvedEnv, resolve_env
from supervisor.cron import CronSchedule
from supervisor.env_file import remove_env_file, write_env_file
from supervisor.errors import CredentialError, SpawnError
from supervisor.health import HealthChange, ProbeResult, watch
from supervisor.logs import Hub, Masker, RunLog, delete_run_logs, run_log_path
from supervisor.model import (
    CompletedEvent,
    Health,
    HealthEvent,
    LogEvent,
    OverlapPolicy,
    ProjectState,
    ProjectStatus,
    RunEvent,
    RunRecord,
    RunStatus,
    RunTrigger,
    StartedEvent,
    StateEvent,
    Stream,
    TriggerMode,
)
from supervisor.policy import Action, RestartTracker
from supervisor.process import (
    ChildProcess,
    ExitStatus,
    HeldProcess,
    StartedProcess,
    open_process,
    write_gate_script,
)
from supervisor.scheduler import WallClock, run_schedule
from supervisor.spawn import (
    ProcessSpec,
    can_hold,
    check_descriptors,
    describe_os_error,
    resolve_argv,
    run_spec,
)
from supervisor.store import Store

logger = logging.getLogger(__name__)

STOPPED_BY_USER = "stopped by user"

# NOTE: past this many seconds of a locked or failing database, a run starts
# before its row is on disk; a crash in that window loses the row, so a
# catch-up may run that fire time again. Its processes are still found by
# their environment markers.
ROW_BEFORE_SPAWN_SECONDS = 2.0

# A held run that no fire claims by this long after its fire time (the
# schedule changed, the wall clock stepped back) is ended.
HELD_RUN_GRACE_SECONDS = 60.0

PRUNE_DELAY_SECONDS = 5.0
"""Seconds between a run's end and the prune of its project's history. One
prune covers every run that ends meanwhile."""


class TriggerOutcome(enum.StrEnum):
    STARTED = "started"
    SKIPPED = "skipped"
    QUEUED = "queued"
    REPLACING = "replacing"
    ALREADY_RUNNING = "already running"


@dataclass(frozen=True)
class TriggerResult:
    outcome: TriggerOutcome
    run_id: int | None
    message: str


@dataclass
class RuntimeContext:
    """Services shared by every runner: store, live events, settings, clocks."""

    store: Store
    hub: Hub
    settings: DaemonSettings
    clock: WallClock
    credentials: CredentialLookup
    folder_secrets: dict[str, set[str]] = field(default_factory=dict)
    """The secrets written into each project folder's `.env.local` since
    start-up, by folder path."""
    started_runs: dict[str, PreparedRun] = field(default_factory=dict)
    """The runs that `runvisor serve` started before the event loop ran
    (see supervisor.boot), by project. Each project's runner takes its own
    as its first run."""

    @property
    def logs_dir(self) -> Path:
        return Path(self.settings.data_dir) / "logs"


@dataclass(kw_only=True)
class PreparedRun:
    """A run whose leader started before its history row was queued.

    Its `.env.local` is written and its variables resolved; its log is
    opened when the run starts. `started_at` is when the leader started, if
    not at the run's start.
    """

    run_id: int
    project: ProjectConfig
    resolved: ResolvedEnv
    spec: ProcessSpec
    run_log: RunLog
    env_written: bool
    process: StartedProcess
    started_at: datetime | None = None


@dataclass(kw_only=True)
class HeldRun(PreparedRun):
    """A scheduled run whose leader started `prestart` seconds ahead of its
    fire time and waits at its gate until the fire releases it.

    Its log is open and its `.env.local` written, so that the fire has
    nothing left to do but record the run and release it. `run_starts` is
    the project's count of run starts when it was held: a run started
    meanwhile may have removed `.env.local` at its end.
    """

    fire_time: datetime
    run_starts: int
    process: HeldProcess
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: bool = False
    """Set once the run has started or has been discarded."""


@dataclass
class ActiveRun:
    record: RunRecord
    prepared: PreparedRun | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    child: ChildProcess | None = None
    stop_reason: str | None = None
    stop_status: RunStatus = RunStatus.STOPPED
    health_failure: str | None = None
    exit_status: ExitStatus | None = None

    def request_stop(self, reason: str, status: RunStatus = RunStatus.STOPPED) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_status = status
        self.scope.cancel()


def is_cancellation(error: BaseException) -> bool:
    """Return whether `error` is trio's Cancelled, alone or grouped.

    A nursery wraps the Cancelled of its tasks in a BaseExceptionGroup, so a
    plain `except trio.Cancelled` misses a cancellation that passed through
    one (such as the output pumps of a run).
    """
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(trio.Cancelled)
        return rest is None
    return False


def utc_now(clock: WallClock) -> datetime:
    return clock.now().astimezone(UTC)


def new_run_log(settings: DaemonSettings, project: str, run_id: int) -> RunLog:
    """Return the log of a run, not opened yet."""
    return RunLog(
        run_log_path(Path(settings.data_dir) / "logs", project, run_id),
        max_bytes=settings.log_max_bytes,
        backups=settings.log_backups,
        open_now=False,
    )


def _prepare_files(run_log: RunLog, folder: Path, variables: Mapping[str, str]) -> bool:
    """Open the run's log, write the project's `.env.local`, and return
    whether it was written.

    Called in the event loop's thread, because creating two small files on
    a local disk takes about 0.25 ms, less than a worker-thread hop. When
    200 runs start at once (a minute boundary of many schedules), their hops
    kept 40 worker threads fighting over the GIL.
    """
    run_log.open()
    if not folder.is_dir():
        return False
    write_env_file(folder, variables)
    return True


class ProjectRunner:
    def __init__(self, project: ProjectConfig, context: RuntimeContext) -> None:
        self.project = project
        self.context = context
        self.tracker = RestartTracker(project)
        self.runs: dict[int, ActiveRun] = {}
        self.state = ProjectState.STOPPED
        self.reason = ""
        self.health = Health.UNKNOWN
        self.last_probe_at: datetime | None = None
        self.next_fire: datetime | None = None
        self.last_run: RunRecord | None = None
        # Set by a person's stop; cleared by start, trigger or restart.
        self.stopped_by_user = False
        # Why the whole runner is being cancelled (removal, shutdown).
        self.shutdown_reason = "the daemon is shutting down"
        self._nursery: trio.Nursery | None = None
        self._queued: tuple[RunTrigger, datetime | None] | None = None
        # Whether an always-running project should be up, and an event that
        # fires (and is replaced) whenever that changes.
        self._up_wanted = False
        self._up_changed = trio.Event()
        self._backoff_scope: trio.CancelScope | None = None
        self._schedule_scope: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._prune_waiting = False
        self._held: HeldRun | None = None
        self._run_starts = 0
        self._last_fire: datetime | None = None

    @property
    def name(self) -> str:
        return self.project.name

    @property
    def mode(self) -> TriggerMode:
        return self.project.trigger

    # -- the project task ---------------------------------------------------

    async def run(
        self,
        *,
        start: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the project until cancelled. `start=False` keeps an
        always-running or scheduled project stopped, as after a person's stop."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not start:
                self.stopped_by_user = True
            if self.mode == TriggerMode.SCHEDULE:
                if start:
                    await nursery.start(self._schedule_host)
                else:
                    self._set_state(ProjectState.STOPPED, STOPPED_BY_USER)
            elif self.mode == TriggerMode.ALWAYS_RUNNING:
                nursery.start_soon(self._supervise, self._take_started_run(start))
                if start:
                    self._set_up_wanted(True)
                else:
                    self._set_state(ProjectState.STOPPED, STOPPED_BY_USER)
            task_status.started()
            await trio.sleep_forever()

    # -- requests from the manager -----------------------------------------

    def trigger(self, trigger: RunTrigger = RunTrigger.MANUAL) -> TriggerResult:
        """Start a run now, as a person asked."""
        if self.mode == TriggerMode.ALWAYS_RUNNING:
            return self.start()
        self.stopped_by_user = False
        return self._request_run(trigger, None)

    def start(self) -> TriggerResult:
        """Start a stopped, exited or fatal always-running project, resume a
        stopped schedule, or trigger a manual project."""
        self.stopped_by_user = False
        if self.mode == TriggerMode.MANUAL:
            return self._request_run(RunTrigger.MANUAL, None)
        if self.mode == TriggerMode.ALWAYS_RUNNING:
            if self._up_wanted:
                return TriggerResult(
                    TriggerOutcome.ALREADY_RUNNING,
                    self._current_run_id(),
                    f"Project {self.name!r} is already running.",
                )
            self.tracker.reset()
            self._set_up_wanted(True)
            return TriggerResult(
                TriggerOutcome.STARTED, None, f"Starting project {self.name!r}."
            )
        if self._schedule_scope is None and self._nursery is not None:
            self._nursery.start_soon(self._schedule_host)
            return TriggerResult(
                TriggerOutcome.STARTED, None, f"Resumed the schedule of {self.name!r}."
            )
        return TriggerResult(
            TriggerOutcome.ALREADY_RUNNING,
            None,
            f"The schedule of {self.name!r} is already active.",
        )

    async def stop(self, reason: str = STOPPED_BY_USER) -> None:
        """Stop every run of the project and keep it stopped; wait until the
        runs are over."""
        self.stopped_by_user = True
        self._queued = None
        self._drop_held("the project was stopped")
        if self.mode == TriggerMode.ALWAYS_RUNNING:
            self._set_up_wanted(False)
            if self._backoff_scope is not None:
                self._backoff_scope.cancel()
        elif self.mode == TriggerMode.SCHEDULE and self._schedule_scope is not None:
            self._schedule_scope.cancel()
            self._schedule_scope = None
            self.next_fire = None
        for active in list(self.runs.values()):
            active.request_stop(reason)
        await self._idle.wait()
        if self.state not in (ProjectState.STOPPED,):
            self._set_state(ProjectState.STOPPED, reason)

    def signal_runs(self) -> None:
        """Send the stop signal to the process group of every run now.

        The daemon's shutdown calls this for every project before it cancels
        them, so that the last of many runs gets its signal without waiting
        for the others to be cancelled and cleaned up. The cancellation then
        stops each run the usual way, without signalling it again.
        """
        sig = signal.Signals[self.project.stop_signal]
        for active in self.runs.values():
            if active.child is not None and active.child.exit_status is None:
                active.child.begin_stop(sig)

    async def restart(self) -> TriggerResult:
        await self.stop()
        result = self.start()
        if result.outcome != TriggerOutcome.STARTED:
            return result
        if self.mode == TriggerMode.ALWAYS_RUNNING:
            message = f"Restarting project {self.name!r}."
        elif self.mode == TriggerMode.SCHEDULE:
            message = f"Restarted the schedule of {self.name!r}."
        else:
            return result  # a manual project's new run: "Started run N ..."
        return TriggerResult(result.outcome, result.run_id, message)

    def update_project(self, project: ProjectConfig) -> None:
        """Apply a changed config to a manual or scheduled project in place.

        A run in progress keeps the settings it started with; the next run
        uses the new ones. A changed schedule restarts the cron loop.
        """
        old = self.project
        self.project = project
        self.tracker.project = project
        schedule_keys = ("cron", "timezone", "catch_up", "jitter", "prestart")
        schedule_changed = any(
            getattr(old, key) != getattr(project, key) for key in schedule_keys
        )
        if (
            self.mode == TriggerMode.SCHEDULE
            and schedule_changed
            and self._schedule_scope is not None
            and self._nursery is not None
        ):
            self._schedule_scope.cancel()
            self._schedule_scope = None
            self._nursery.start_soon(self._schedule_host)

    def status(self) -> ProjectStatus:
        current = self._current_run()
        return ProjectStatus(
            name=self.name,
            trigger=self.mode,
            state=self.state,
            reason=self.reason,
            # Probes belong to a run: with none running, the last result is
            # stale, and a stopped project would show as "healthy".
            health=self.health if current else Health.UNKNOWN,
            last_probe_at=self.last_probe_at,
            pid=current.record.pid if current else None,
            run_id=current.record.id if current else None,
            started_at=current.record.started_at if current else None,
            restarts=self.tracker.restarts,
            has_probe=self.project.health is not None,
            # The current run is the latest one; `last_run` is the latest
            # that ended.
            last_run=current.record if current else self.last_run,
            next_fire=self.next_fire,
        )

    # -- schedule -------------------------------------------------------------

    async def _schedule_host(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.project.cron is not None
        schedule = CronSchedule(self.project.cron, self.project.timezone)
        last_fire = await self.context.store.last_fire_time(self.name)
        with trio.CancelScope() as scope:
            self._schedule_scope = scope
            if not self.runs:
                self._set_state(ProjectState.SCHEDULED, "")
            await run_schedule(
                schedule,
                self,
                self.context.clock,
                last_fire=last_fire,
                catch_up=self.project.catch_up,
                jitter=self.project.jitter,
                on_next=self._on_next_fire,
                prepare=self.prepare,
                prestart=self.project.prestart,
                name=self.name,
                task_status=task_status,
            )

    def _on_next_fire(self, when: datetime | None) -> None:
        self.next_fire = when

    def fire(self, fire_time: datetime, trigger: RunTrigger) -> None:
        """Called by the cron loop at each fire time."""
        self._last_fire = fire_time
        held = self._held
        self._held = None
        if held is not None:
            held.scope.cancel()
            reason = self._unusable(held, fire_time, trigger)
            if reason is not None:
                self._discard_held(held, reason)
                held = None
        if self.stopped_by_user:
            return
        if held is not None:
            held.done = True
            self._start_run(trigger, fire_time, held)
            return
        self._request_run(trigger, fire_time)

    def _unusable(
        self, held: HeldRun, fire_time: datetime, trigger: RunTrigger
    ) -> str | None:
        """Say why a held run cannot be the run of this fire, or None."""
        if self.stopped_by_user:
            return "the project was stopped"
        if held.fire_time != fire_time or trigger != RunTrigger.SCHEDULE:
            return f"it was held for {held.fire_time}, not this fire"
        if held.project != self.project:
            return "the project's config changed"
        if held.run_starts != self._run_starts:
            return "another run started meanwhile"
        if held.process.script_changed():
            return "the script changed meanwhile"
        return None

    def prepare(self, fire_time: datetime) -> None:
        """Called by the cron loop `prestart` seconds before a fire time:
        start the run's leader now and hold it until the fire."""
        self._drop_held("a newer fire time was prepared")
        if self.stopped_by_user or self.runs or self._nursery is None:
            return
        self._nursery.start_soon(self._hold, fire_time)

    async def _hold(self, fire_time: datetime) -> None:
        project = self.project
        context = self.context
        try:
            resolved = await resolve_env(project, context.credentials)
        except CredentialError:
            return  # the run at the fire time fails with the reason
        if self.project is not project or self.runs or self.stopped_by_user:
            return
        if self._last_fire is not None and self._last_fire >= fire_time:
            return  # the fire came first, so its run started the usual way

        # Checked before a run id is reserved, so a project that cannot be
        # held skips no id.
        probe = ProcessSpec(command=project.command, cwd=Path(project.path))
        try:
            if not can_hold(probe, resolve_argv(probe)):
                return
        except SpawnError:
            return  # as above
        run_id = context.store.next_run_id()
        spec = run_spec(
            project,
            resolved.variables,
            context.settings.data_dir,
            run_id,
            RunTrigger.SCHEDULE,
        )
        run_log = new_run_log(self.context.settings, self.name, run_id)

        try:
            process = HeldProcess(spec, write_gate_script(context.settings.data_dir))
        except (SpawnError, OSError, ValueError) as error:
            # The run at the fire time starts the usual way and reports
            # any failure.
            logger.info(
                "not held: project=%s run=%d %s; the run id is skipped",
                self.name,
                run_id,
                error,
            )
            return
        try:
            env_written = _prepare_files(run_log, spec.cwd, resolved.variables)
        except OSError as error:
            logger.info(
                "not held: project=%s run=%d %s; the run id is skipped",
                self.name,
                run_id,
                error,
            )
            run_log.close()
            process.discard()
            return
        held = HeldRun(
            fire_time=fire_time,
            run_id=run_id,
            project=project,
            resolved=resolved,
            spec=spec,
            run_log=run_log,
            env_written=env_written,
            run_starts=self._run_starts,
            process=process,
        )
        self._drop_held("a newer fire time was prepared")
        self._held = held

        logger.debug(
            "holding: project=%s run=%d pid=%d fire_time=%s",
            self.name,
            run_id,
            process.pid,
            fire_time,
        )
        expired = False
        try:
            with held.scope:
                await trio.sleep(project.prestart + HELD_RUN_GRACE_SECONDS)
                expired = True
        finally:
            if self._held is held:
                self._held = None
            if not held.done:
                # Not expired: the runner ends (a shutdown, a removal).
                reason = "no fire came for it" if expired else self.shutdown_reason
                self._discard_held(held, reason)

    def _drop_held(self, reason: str) -> None:
        held = self._held
        self._held = None
        if held is not None:
            held.scope.cancel()
            self._discard_held(held, reason)

    def _discard_held(self, held: HeldRun, reason: str) -> None:
        if held.done:
            return
        held.done = True
        held.scope.cancel()
        self._discard_prepared(held, reason)

    def _discard_prepared(self, prepared: PreparedRun, reason: str) -> None:
        """End a run whose leader started but that will not run, and remove
        its files. Its run id is skipped, which the log line explains."""
        prepared.process.discard()
        prepared.run_log.close()
        with contextlib.suppress(OSError):
            prepared.run_log.path.unlink()
        project = prepared.project
        if prepared.env_written and not project.keep_env_file and not self.runs:
            remove_env_file(Path(project.path))
        logger.info(
            "%s run discarded: project=%s run=%d %s; the run id is skipped",
            "held" if isinstance(prepared, HeldRun) else "early",
            self.name,
            prepared.run_id,
            reason,
        )

    # -- manual and scheduled runs -------------------------------------------

    def _request_run(
        self, trigger: RunTrigger, fire_time: datetime | None
    ) -> TriggerResult:
        busy = [run for run in self.runs.values() if run.stop_reason is None]
        if not busy:
            run_id = self._start_run(trigger, fire_time)
            return TriggerResult(
                TriggerOutcome.STARTED,
                run_id,
                f"Started run {run_id} of {self.name!r}.",
            )

        overlap = self.project.overlap
        running_ids = ", ".join(str(run.record.id) for run in busy)
        if overlap == OverlapPolicy.ALLOW:
            run_id = self._start_run(trigger, fire_time)
            return TriggerResult(
                TriggerOutcome.STARTED,
                run_id,
                f"Started run {run_id} of {self.name!r}.",
            )
        if overlap == OverlapPolicy.QUEUE and self._queued is None:
            self._queued = (trigger, fire_time)
            return TriggerResult(
                TriggerOutcome.QUEUED,
                None,
                f"Run {running_ids} of {self.name!r} is still running; "
                "the new run starts when it ends (overlap = queue).",
            )
        if overlap == OverlapPolicy.REPLACE:
            self._queued = (trigger, fire_time)
            for run in busy:
                run.request_stop("replaced by a newer run (overlap = replace)")
            return TriggerResult(
                TriggerOutcome.REPLACING,
                None,
                f"Stopping run {running_ids} of {self.name!r} to start a new one "
                "(overlap = replace).",
            )

        if overlap == OverlapPolicy.QUEUE:
            reason = f"run {running_ids} still running and one run already queued"
        else:
            reason = f"run {running_ids} still running (overlap = skip)"
        run_id = self._record_skipped(trigger, fire_time, reason)
        return TriggerResult(
            TriggerOutcome.SKIPPED,
            run_id,
            f"Skipped: {reason}; recorded as run {run_id}.",
        )

    def _record_skipped(
        self, trigger: RunTrigger, fire_time: datetime | None, reason: str
    ) -> int:
        now = utc_now(self.context.clock)
        record = RunRecord(
            id=self.context.store.next_run_id(),
            project=self.name,
            trigger=trigger,
            status=RunStatus.SKIPPED,
            started_at=now,
            ended_at=now,
            reason=reason,
            fire_time=fire_time,
        )
        self.context.store.put_run(record)
        logger.info("skipped: project=%s run=%d %s", self.name, record.id, reason)
        self._publish_completed(record)
        return record.id

    def _start_run(
        self,
        trigger: RunTrigger,
        fire_time: datetime | None,
        prepared: PreparedRun | None = None,
    ) -> int:
        assert self._nursery is not None
        active = self._new_active_run(trigger, fire_time, prepared)
        self._nursery.start_soon(self._run_and_follow_up, active)
        return active.record.id

    async def _run_and_follow_up(self, active: ActiveRun) -> None:
        await self._execute(active)
        if self.runs:
            return
        if self._queued is not None and not self.stopped_by_user:
            trigger, fire_time = self._queued
            self._queued = None
            self._start_run(trigger, fire_time)
        elif self.stopped_by_user:
            self._set_state(ProjectState.STOPPED, STOPPED_BY_USER)
        elif self.mode == TriggerMode.SCHEDULE:
            self._set_state(ProjectState.SCHEDULED, "")
        else:
            self._set_state(ProjectState.EXITED, self._describe(active.record))

    # -- always running -------------------------------------------------------

    def _take_started_run(self, start: bool) -> PreparedRun | None:
        """Take the run that `runvisor serve` started for this project
        before the event loop ran, if any and if it is of this config."""
        started = self.context.started_runs.get(self.name)
        if start and started is not None and started.project == self.project:
            del self.context.started_runs[self.name]
            return started
        return None

    async def _supervise(self, started: PreparedRun | None = None) -> None:
        """Keep the project up while it is wanted up. `started` is a first
        run whose leader started already."""
        trigger = RunTrigger.STARTUP
        try:
            while True:
                if started is not None and not self._up_wanted:
                    self._discard_prepared(started, "the project was stopped")
                    started = None
                while not self._up_wanted:
                    changed = self._up_changed
                    await changed.wait()
                active = self._new_active_run(trigger, None, started)
                started = None
                trigger = await self._supervise_run(active)
        finally:
            if started is not None:
                self._discard_prepared(started, self.shutdown_reason)

    async def _supervise_run(self, active: ActiveRun) -> RunTrigger:
        """Run one run of an always-running project and apply the restart
        policy; return the trigger of the next run."""
        record = await self._execute(active)

        if active.stop_reason is not None:
            # A person's stop or restart: never a failure, never restarted.
            self._set_state(ProjectState.STOPPED, active.stop_reason)
            return RunTrigger.MANUAL

        exit_status = active.exit_status or ExitStatus(None, None)
        decision = self.tracker.on_exit(
            exit_code=exit_status.exit_code,
            signal=exit_status.signal,
            uptime=active.child.uptime if active.child is not None else 0.0,
            now=trio.current_time(),
            health_failure=active.health_failure is not None,
        )
        if decision.action == Action.EXIT:
            self._set_up_wanted(False)
            self._set_state(ProjectState.EXITED, decision.reason)
            return RunTrigger.MANUAL
        if decision.action == Action.GIVE_UP:
            self._set_up_wanted(False)
            logger.warning(
                "gave up: project=%s run=%d %s",
                self.name,
                record.id,
                decision.reason,
            )
            self._record_event("gave_up", record.id, decision.reason)
            self._set_state(ProjectState.FATAL, decision.reason)
            return RunTrigger.MANUAL

        self._set_state(
            ProjectState.BACKOFF,
            f"restarting in {format_duration(decision.delay)} after "
            f"{self._describe(record)}",
        )
        logger.info(
            "backoff: project=%s run=%d delay=%.3fs",
            self.name,
            record.id,
            decision.delay,
        )
        with trio.CancelScope() as backoff:
            self._backoff_scope = backoff
            await trio.sleep(decision.delay)
        self._backoff_scope = None
        if backoff.cancelled_caught or not self._up_wanted:
            self._set_state(ProjectState.STOPPED, STOPPED_BY_USER)
            return RunTrigger.MANUAL
        logger.info("restarting: project=%s after run=%d", self.name, record.id)
        self._record_event("restart", record.id, self._describe(record))
        return RunTrigger.RESTART

    # -- one run ----------------------------------------------------------------

    def _new_active_run(
        self,
        trigger: RunTrigger,
        fire_time: datetime | None,
        prepared: PreparedRun | None = None,
    ) -> ActiveRun:
        self._run_starts += 1
        started_at = None if prepared is None else prepared.started_at
        record = RunRecord(
            id=prepared.run_id if prepared else self.context.store.next_run_id(),
            project=self.name,
            trigger=trigger,
            status=RunStatus.RUNNING,
            started_at=started_at or utc_now(self.context.clock),
            fire_time=fire_time,
        )
        active = ActiveRun(record=record, prepared=prepared)
        self.runs[record.id] = active
        self._idle = trio.Event()
        return active

    async def _execute(self, active: ActiveRun) -> RunRecord:
        """Run one run from start to its final history row."""
        project = self.project
        context = self.context
        record = active.record
        folder = Path(project.path)
        prepared = active.prepared
        if prepared is not None:
            run_log = prepared.run_log
            env_written = prepared.env_written
        else:
            run_log = new_run_log(self.context.settings, self.name, record.id)
            env_written = False
        masker = Masker(())
        starting_state = (
            ProjectState.STARTING
            if self.mode == TriggerMode.ALWAYS_RUNNING
            else ProjectState.RUNNING
        )
        self._set_state(starting_state, f"run {record.id} ({record.trigger})")
        if project.health is not None:
            # Health and its counters belong to one run.
            self.last_probe_at = None
            self._set_health(record.id, Health.UNKNOWN, f"run {record.id} started")
        context.store.put_run(record)

        def on_output(stream: Stream, lines: Sequence[str], at: float) -> None:
            if masker:
                lines = [masker.mask(line) for line in lines]
            run_log.write(stream, lines, at)
            if context.hub.has_subscribers:
                stamp = datetime.fromtimestamp(at, UTC)
                for line in lines:
                    context.hub.publish(
                        LogEvent(
                            project=self.name,
                            run_id=record.id,
                            stream=stream,
                            text=line,
                            at=stamp,
                        )
                    )

        try:
            with active.scope:
                # Before the first await: runs that start at once then count
                # each other's open files.
                check_descriptors()
                if prepared is not None:
                    resolved = prepared.resolved
                    spec = prepared.spec
                    run_log.open()
                else:
                    resolved = await resolve_env(project, context.credentials)
                    spec = run_spec(
                        project,
                        resolved.variables,
                        context.settings.data_dir,
                        record.id,
                        record.trigger,
                    )
                # Projects that share a folder share its `.env.local`, and a
                # run may print what another project's run wrote there. So
                # each run masks the secrets of every run in its folder.
                shared = context.folder_secrets.setdefault(str(folder), set())
                shared.update(resolved.secrets)
                masker = Masker(resolved.secrets, shared)
                if prepared is None:
                    env_written = _prepare_files(run_log, folder, resolved.variables)
                # The row must be on disk before the child exists (or, when
                # held, before it is released): after a crash it is what
                # marks the run lost, and its fire time keeps a catch-up from
                # running that fire time again. A database locked for longer
                # delays the start only this long. A run started before the
                # event loop runs already, and its processes carry the data
                # dir's marker, by which the next start ends them. It goes
                # on without a checkpoint, so that a stop from here on ends
                # it the usual way, with what left its group and its output.
                if prepared is None or isinstance(prepared, HeldRun):
                    with trio.move_on_after(ROW_BEFORE_SPAWN_SECONDS):
                        await context.store.flush()
                if prepared is not None and active.stop_reason is None:
                    prepared.process.release()
                    # Runs released together wake up from the same commit:
                    # each releases before any of them sets up its output,
                    # so the last release is not held up by the others. A
                    # cancellation now would kill the script unstopped.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                # From here on a stop cancels only the waiting for the child,
                # so `_wait_run` stops it the normal way (state `stopping`),
                # even when the stop arrives while the child is being spawned.
                active.scope = trio.CancelScope()
                async with open_process(
                    spec,
                    on_output,
                    stop_signal=signal.Signals[project.stop_signal],
                    stop_timeout=project.stop_timeout,
                    keep_whole=masker.values,
                    started=prepared.process if prepared else None,
                ) as child:
                    active.child = child
                    record.pid = child.pid
                    context.store.put_run(record)
                    logger.info(
                        "spawned: project=%s run=%d pid=%d trigger=%s",
                        self.name,
                        record.id,
                        child.pid,
                        record.trigger,
                    )
                    context.hub.publish(
                        StartedEvent(
                            project=self.name,
                            run_id=record.id,
                            trigger=record.trigger,
                            pid=child.pid,
                            at=record.started_at,
                        )
                    )
                    active.exit_status = await self._wait_run(
                        active, child, spec.env, masker
                    )
            if active.stop_reason is not None and active.child is not None:
                # The stop came before or while the child was spawned.
                active.exit_status = active.child.exit_status
            self._finish_record(active, record)
        except (SpawnError, CredentialError, OSError) as error:
            if isinstance(error, OSError):
                reason = masker.mask(describe_os_error(error))
            else:
                reason = masker.mask(str(error))
            record.status = RunStatus.FAILED
            record.reason = reason
            run_log.write(Stream.ERR, [f"runvisor: {reason}"], time.time())
            logger.warning(
                "failed to start: project=%s run=%d %s", self.name, record.id, reason
            )
        except BaseException as error:
            if not is_cancellation(error):
                raise
            record.status = RunStatus.STOPPED
            record.reason = active.stop_reason or self.shutdown_reason
            if active.child is not None and active.child.exit_status is not None:
                self._set_exit(record, active.child.exit_status)
            raise
        finally:
            # No await in here, so cancellation cannot cut it short.
            if prepared is not None:
                # Ends a leader that the run did not get to use.
                prepared.process.discard()
            run_log.close()
            if env_written and not project.keep_env_file:
                remove_env_file(folder)
            if record.status == RunStatus.RUNNING:
                record.status = RunStatus.FAILED
                record.reason = record.reason or "the run ended unexpectedly"
            # The status stays what the exit code gives, but the history shows that
            # the log is incomplete, such as on a full disk.
            drop_note = run_log.drop_note()
            if drop_note:
                record.reason = (
                    f"{record.reason}; {drop_note}" if record.reason else drop_note
                )
            record.ended_at = utc_now(context.clock)
            context.store.put_run(record)
            self.last_run = record
            self.runs.pop(record.id, None)
            if not self.runs:
                self._idle.set()
            failed = record.status in (RunStatus.FAILED, RunStatus.TIMED_OUT)
            logger.log(
                logging.WARNING if failed else logging.INFO,
                "%s: project=%s run=%d pid=%s exit_code=%s signal=%s %s",
                "stopped" if record.status == RunStatus.STOPPED else "exited",
                self.name,
                record.id,
                record.pid,
                record.exit_code,
                record.signal,
                record.reason,
            )
            self._publish_completed(record)
        # Pruning may wait for another process's lock on the database, so
        # it must not hold up what follows the run (a restart, a queued run).
        # One waiting prune covers every run that ended before it starts.
        if not self._prune_waiting:
            self._prune_waiting = True
            assert self._nursery is not None
            self._nursery.start_soon(self._prune)
        return record

    async def _wait_run(
        self,
        active: ActiveRun,
        child: ChildProcess,
        env: Mapping[str, str],
        masker: Masker,
    ) -> ExitStatus:
        """Wait for the run to end by itself, or stop it when its scope is
        cancelled (a person's stop, replacement, health) or it times out.

        The health probe, if any, runs next to the wait and ends with it.
        """
        project = self.project
        timeout = project.timeout if project.timeout is not None else math.inf
        with active.scope:
            with trio.move_on_after(timeout) as timeout_scope:
                async with trio.open_nursery() as nursery:
                    if project.health is not None:
                        nursery.start_soon(self._watch_health, active, env, masker)
                    status = await self._wait_child(active, child)
                    nursery.cancel_scope.cancel()
                return status
            if timeout_scope.cancelled_caught and active.stop_reason is None:
                active.stop_reason = f"timed out after {format_duration(timeout)}"
                active.stop_status = RunStatus.TIMED_OUT
        stopping_reason = active.stop_reason or ""
        if active.health_failure is not None:
            stopping_reason = f"restarting for health: {active.health_failure}"
        self._set_state(ProjectState.STOPPING, stopping_reason)
        logger.info(
            "stopping: project=%s run=%d pid=%d signal=%s timeout=%s",
            self.name,
            active.record.id,
            child.pid,
            project.stop_signal,
            format_duration(project.stop_timeout),
        )
        status = await child.stop(
            signal.Signals[project.stop_signal], project.stop_timeout
        )
        if child.killed:
            logger.warning(
                "killed: project=%s run=%d pid=%d after stop_timeout=%s",
                self.name,
                active.record.id,
                child.pid,
                format_duration(project.stop_timeout),
            )
        return status

    async def _wait_child(self, active: ActiveRun, child: ChildProcess) -> ExitStatus:
        """Wait for the child to exit. An always-running run turns `running`
        once it has stayed up for `start_seconds`."""
        project = self.project
        if self.mode == TriggerMode.ALWAYS_RUNNING:
            # From the leader's start, which for a run started before the
            # event loop came before the run's.
            with trio.move_on_at(child.started_at + project.start_seconds):
                return await child.wait()
            self._set_state(ProjectState.RUNNING, f"run {active.record.id}")
            logger.info(
                "running: project=%s run=%d pid=%d up for start_seconds=%s",
                self.name,
                active.record.id,
                child.pid,
                format_duration(project.start_seconds),
            )
        return await child.wait()

    async def _watch_health(
        self, active: ActiveRun, env: Mapping[str, str], masker: Masker
    ) -> None:
        """Probe the run; when it must be restarted for health, stop it the
        normal way, marked so the restart policy counts it as a failure."""
        health = self.project.health
        assert health is not None
        run_id = active.record.id

        def on_result(result: ProbeResult, change: HealthChange | None) -> None:
            self.last_probe_at = utc_now(self.context.clock)
            logger.debug(
                "probe %s: project=%s run=%d duration=%.3fs %s",
                "succeeded" if result.ok else "failed",
                self.name,
                run_id,
                result.duration,
                masker.mask(result.error),
            )
            if change is not None:
                self._set_health(run_id, change.new, masker.mask(change.reason))

        error = await watch(
            health, cwd=Path(self.project.path), env=env, on_result=on_result
        )
        if active.stop_reason is None:
            active.health_failure = masker.mask(error)
            active.scope.cancel()

    def _finish_record(self, active: ActiveRun, record: RunRecord) -> None:
        status = active.exit_status or ExitStatus(None, None)
        killed = active.child.killed if active.child is not None else False
        self._set_exit(record, status)
        if active.health_failure is not None:
            record.status = RunStatus.FAILED
            record.reason = f"restarted for health: {active.health_failure}"
        elif active.stop_reason is not None:
            record.status = active.stop_status
            record.reason = active.stop_reason
            if killed:
                record.reason += (
                    f"; killed with SIGKILL after stop_timeout = "
                    f"{format_duration(self.project.stop_timeout)}"
                )
        elif self.tracker.is_success(status.exit_code, status.signal):
            record.status = RunStatus.SUCCEEDED
            record.reason = status.describe()
        else:
            record.status = RunStatus.FAILED
            record.reason = status.describe()

    @staticmethod
    def _set_exit(record: RunRecord, status: ExitStatus) -> None:
        record.exit_code = status.exit_code
        record.signal = status.signal

    async def _prune(self) -> None:
        # Prunes share the database's write connection with the rows that
        # starting runs wait for. Waiting first lets a burst of starts (a
        # minute boundary of many schedules) write its rows before the
        # burst of prunes that its runs' ends set off.
        await trio.sleep(PRUNE_DELAY_SECONDS)
        # Let the final rows of the runs that just ended reach the database,
        # so this prune finds them.
        await self.context.store.flush()
        self._prune_waiting = False
        deleted = await self.context.store.prune(
            self.name, self.context.settings.history_keep
        )
        if deleted:
            delete_run_logs(self.context.logs_dir, self.name, deleted)

    # -- bookkeeping ------------------------------------------------------------

    def _set_up_wanted(self, wanted: bool) -> None:
        self._up_wanted = wanted
        self._up_changed.set()
        self._up_changed = trio.Event()

    def _current_run(self) -> ActiveRun | None:
        if not self.runs:
            return None
        return self.runs[max(self.runs)]

    def _current_run_id(self) -> int | None:
        current = self._current_run()
        return current.record.id if current else None

    def _set_state(self, new: ProjectState, reason: str) -> None:
        old = self.state
        if old == new and self.reason == reason:
            return
        self.state = new
        self.reason = reason
        now = utc_now(self.context.clock)
        self.context.hub.publish(
            StateEvent(project=self.name, old=old, new=new, reason=reason, at=now)
        )
        if old != new:
            self._record_event(
                "state", self._current_run_id(), f"{old} -> {new}: {reason}"
            )

    def _set_health(self, run_id: int, new: Health, reason: str) -> None:
        old = self.health
        if old == new:
            return
        self.health = new
        level = logging.WARNING if new == Health.UNHEALTHY else logging.INFO
        logger.log(
            level,
            "health %s: project=%s run=%d %s",
            new,
            self.name,
            run_id,
            reason,
        )
        self.context.hub.publish(
            HealthEvent(
                project=self.name,
                run_id=run_id,
                old=old,
                new=new,
                reason=reason,
                at=utc_now(self.context.clock),
            )
        )
        self._record_event("health", run_id, f"{old} -> {new}: {reason}")

    def _record_event(self, kind: str, run_id: int | None, detail: str) -> None:
        self.context.store.put_event(
            RunEvent(
                project=self.name,
                kind=kind,
                at=utc_now(self.context.clock),
                run_id=run_id,
                detail=detail,
            )
        )

    def _publish_completed(self, record: RunRecord) -> None:
        self.context.hub.publish(
            CompletedEvent(
                project=self.name,
                run_id=record.id,
                status=record.status,
                exit_code=record.exit_code,
                signal=record.signal,
                reason=record.reason,
                at=record.ended_at or utc_now(self.context.clock),
            )
        )

    @staticmethod
    def _describe(record: RunRecord) -> str:
        return f"run {record.id} {record.status}: {record.reason}".rstrip(": ")
