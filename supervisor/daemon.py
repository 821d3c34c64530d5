"""The root of the daemon: store, manager, signal handling and reload.

One trio nursery runs the store's writer task, and inside it the services:
the manager with every project, and the signal watcher. Shutdown stops the
manager first, so every run's final history row is queued before the
writer flushes and closes.

Signals: SIGTERM and SIGINT stop every run (whole process groups) and exit
0; SIGHUP reloads the config.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from supervisor.boot import (
    DAEMON_SIGNALS,
    DATABASE_NAME,
    Boot,
    EarlyRun,
    take_resources,
)
from supervisor.config import (
    Config,
    ConfigDiff,
    CredentialRef,
    check_config,
    load_config,
)
from supervisor.control_server import ControlServer
from supervisor.credentials import (
    BackendCredentials,
    CredentialLookup,
    ResolvedEnv,
    credential_warnings,
    known_credentials,
)
from supervisor.database import Database
from supervisor.env_file import remove_env_file
from supervisor.logs import Hub
from supervisor.manager import Manager
from supervisor.model import ReloadEvent, RunRecord, RunStatus, RunTrigger
from supervisor.process import (
    LeftoverRun,
    StopSettings,
    adopt_process,
    end_leftover_runs,
    reap_orphans,
)
from supervisor.runner import PreparedRun, RuntimeContext, new_run_log
from supervisor.scheduler import SystemClock, WallClock
from supervisor.spawn import become_subreaper
from supervisor.store import Store

logger = logging.getLogger(__name__)

# Seconds after READY=1 until start-up counts as over, for
# `_release_start_up_memory`: runs have started and taken their first
# steps by then.
START_UP_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    dry_run: bool
    diff: ConfigDiff | None
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    at: datetime
    config: Config | None = None
    """The validated new config, when `ok`."""


def notify_systemd(state: str) -> None:
    """Send a state line such as READY=1 to systemd's notify socket, if any.

    The send never blocks: it runs on trio's thread, and a receiver whose
    queue is full (about ten unread messages) would otherwise freeze the
    whole daemon. Such a message is dropped with a warning.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
    except OSError as error:
        logger.warning("cannot notify systemd at %s: %s", address, error)


def maps_credentials(config: Config) -> bool:
    """Return whether any project maps a global credential."""
    return any(
        isinstance(mapping, CredentialRef)
        for project in config.projects.values()
        for mapping in project.env.values()
    )


class Daemon:
    """A running runvisor daemon for one config file."""

    def __init__(
        self,
        config_path: Path,
        *,
        clock: WallClock | None = None,
        credentials: CredentialLookup | None = None,
        boot: Boot | None = None,
    ) -> None:
        """`boot` contains what `runvisor serve` took and started before the
        event loop ran, for the config of `config_path` that it loaded."""
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self._boot = boot
        self.config: Config = boot.config if boot else load_config(config_path)
        # An injected lookup (tests) is kept as it is. Otherwise `serve`
        # builds one from [credentials] backend, and a reload that changes
        # that setting or the data dir builds a new one.
        self._owns_credentials = credentials is None
        self.credentials: CredentialLookup | None = credentials
        self._key_environment: dict[str, str] = {}
        self.hub = Hub()
        self.store: Store | None = None
        self.manager: Manager | None = None
        self.last_reload: ReloadOutcome | None = None
        self.started_at: datetime | None = None
        self._shutdown = trio.Event()
        self._reload_lock = trio.Lock()

    @property
    def data_dir(self) -> Path:
        return Path(self.config.runvisor.data_dir)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def serve(
        self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM, SIGINT or `request_shutdown`."""
        early: list[EarlyRun] = []
        database: Database | None = None
        if self._boot is not None:
            resources, database, early = self._boot.take()
        else:
            resources = await trio.to_thread.run_sync(take_resources, self.config)
        try:
            self._key_environment = resources.key_environment
            if database is None:
                database = Database.open(self.data_dir / DATABASE_NAME)
            store = Store(database)
        except BaseException:
            for run in early:
                run.end()
            resources.close()
            raise
        self.store = store
        self.started_at = datetime.now(UTC)
        if become_subreaper():
            logger.debug("runvisor is the child subreaper of its runs")
        # Before the orphan reaper starts: it must leave their exit status
        # to their runs.
        started_runs = self._adopt(early, store)
        try:
            await self._recover_lost_runs(store, started_runs)
            if self.credentials is None:
                self.credentials = await self._open_credentials(self.config)
            for warning in await self._credential_warnings(self.config):
                logger.warning("config: %s", warning)
            context = RuntimeContext(
                store=store,
                hub=self.hub,
                settings=self.config.runvisor,
                clock=self.clock,
                credentials=self.credentials,
                started_runs=started_runs,
            )
            async with trio.open_nursery() as root:
                await root.start(store.writer)
                await root.start(reap_orphans)
                with trio.open_signal_receiver(*DAEMON_SIGNALS) as signals:
                    if self._boot is not None:
                        # Those that came before the event loop ran: sent
                        # again, so that the receiver gets them.
                        for signum in self._boot.signals.received:
                            os.kill(os.getpid(), signum)
                    async with trio.open_nursery() as services:
                        manager = Manager(self.config, context)
                        self.manager = manager
                        await services.start(manager.run)
                        # A project takes its early run as it starts.
                        self._discard_unclaimed(
                            started_runs, "its project did not start with it"
                        )
                        await services.start(
                            ControlServer(self).serve, resources.control
                        )
                        services.start_soon(self._watch_signals, signals)
                        logger.info(
                            "running: config=%s projects=%d data_dir=%s pid=%d",
                            self.config_path,
                            len(self.config.projects),
                            self.data_dir,
                            os.getpid(),
                        )
                        notify_systemd("READY=1")
                        services.start_soon(self._release_start_up_memory)
                        task_status.started(self)
                        await self._shutdown.wait()
                        logger.info("stopping: every project")
                        notify_systemd("STOPPING=1")
                        await manager.shutdown()
                        services.cancel_scope.cancel()
                root.cancel_scope.cancel()
        finally:
            self._discard_unclaimed(
                started_runs, "the daemon stopped before its project started"
            )
            store.close()
            resources.close()
        logger.info("stopped")

    async def _release_start_up_memory(self) -> None:
        """Once start-up has settled, give the memory that its short-lived
        objects left free back to the system, once.

        Starting 100 runs left about 0.5 MiB free but held in the C
        allocator's lists (measured in bench/), which an idle daemon may
        never use again. glibc's `malloc_trim` releases it; elsewhere this
        does nothing.
        """
        await trio.sleep(START_UP_SETTLE_SECONDS)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                logger.info("SIGHUP received: reloading %s", self.config_path)
                await self.reload()
            else:
                logger.info("%s received: shutting down", signal.Signals(signum).name)
                self.request_shutdown()

    async def _recover_lost_runs(
        self, store: Store, started_runs: Mapping[str, PreparedRun]
    ) -> None:
        # Processes first, rows second: a crash in between leaves the rows
        # `running`, so the next start does both again. Runs started before
        # the event loop exist only when no process was left (see
        # supervisor.boot), and carry this data dir's marker themselves.
        if not started_runs:
            stop_settings = {
                name: StopSettings(
                    signal.Signals[project.stop_signal], project.stop_timeout
                )
                for name, project in self.config.projects.items()
            }
            leftovers = await end_leftover_runs(self.data_dir, stop_settings)
            self._record_unrecorded(store, leftovers)
        # No run of this daemon has started yet, so a `.env.local` here belongs
        # to no run, most likely one of a daemon killed during a run; those
        # of the runs started before the event loop are new.
        written = {str(run.spec.cwd) for run in started_runs.values()}
        for project in self.config.projects.values():
            if project.keep_env_file or str(Path(project.path)) in written:
                continue
            if remove_env_file(Path(project.path), stale=True):
                logger.warning("removed %s/.env.local, found at start-up", project.path)
        lost = await store.mark_lost(datetime.now(UTC))
        for record in lost:
            logger.warning(
                "lost: project=%s run=%d pid=%s was running when the daemon stopped",
                record.project,
                record.id,
                record.pid,
            )

    def _record_unrecorded(self, store: Store, leftovers: list[LeftoverRun]) -> None:
        """Record as lost the leftover runs that have no history row.

        A run started before the event loop, or held for its fire time, is
        recorded after its start; a daemon killed in between leaves none.
        Their ids are above every stored one, and are not handed out again.
        """
        now = datetime.now(UTC)
        last_stored = store.last_run_id
        for leftover in leftovers:
            try:
                run_id = int(leftover.run_id)
                trigger = RunTrigger(leftover.trigger)
            except ValueError:
                continue
            if run_id <= last_stored:
                continue
            store.reserve_run_ids(run_id)
            store.put_run(
                RunRecord(
                    id=run_id,
                    project=leftover.project,
                    trigger=trigger,
                    status=RunStatus.LOST,
                    started_at=now,
                    ended_at=now,
                    reason=(
                        "the daemon stopped before it recorded the run; its "
                        "processes were ended at the next start"
                    ),
                )
            )

    def _adopt(self, early: list[EarlyRun], store: Store) -> dict[str, PreparedRun]:
        """Take over the runs that `runvisor serve` started before the
        event loop ran, by project."""
        adopted: dict[str, PreparedRun] = {}
        now = time.monotonic()
        for run in early:
            process = adopt_process(
                run.popen, run.stdout, run.stderr, run.spec, now - run.started_monotonic
            )
            store.reserve_run_ids(run.run_id)
            adopted[run.project.name] = PreparedRun(
                run_id=run.run_id,
                project=run.project,
                resolved=ResolvedEnv(variables=run.variables, secrets=run.secrets),
                spec=run.spec,
                run_log=new_run_log(self.config.runvisor, run.project.name, run.run_id),
                env_written=True,
                process=process,
                started_at=run.started_at,
            )
        if adopted:
            logger.info(
                "started before the event loop: %d always-running projects",
                len(adopted),
            )
        return adopted

    def _discard_unclaimed(
        self, started_runs: dict[str, PreparedRun], reason: str
    ) -> None:
        """End the early runs that no project took over."""
        while started_runs:
            name, run = started_runs.popitem()
            run.process.discard()
            if not run.project.keep_env_file:
                remove_env_file(run.spec.cwd)
            logger.info(
                "early run discarded: project=%s run=%d %s; the run id is skipped",
                name,
                run.run_id,
                reason,
            )

    async def _open_credentials(self, config: Config) -> BackendCredentials:
        """Choose the credential backend and log which one, once."""
        lookup = BackendCredentials(
            config.credentials.backend,
            Path(config.runvisor.data_dir),
            self._key_environment,
        )
        if not maps_credentials(config):
            # keyring and cryptography cost about 20 MB of memory once
            # imported, so a daemon whose projects map no credential never
            # loads them; the first lookup chooses the backend.
            logger.info(
                "credentials: no project maps a credential; the %r backend is "
                "chosen at the first lookup",
                config.credentials.backend,
            )
            return lookup
        await lookup.open()
        if lookup.info is not None:
            logger.info(
                "credentials: %s (%s)", lookup.info.summary(), lookup.info.reason
            )
        else:
            logger.warning(
                "credentials: %s Runs that map a credential fail until then.",
                lookup.problem,
            )
        return lookup

    async def _credential_warnings(self, config: Config) -> list[str]:
        database = Path(config.runvisor.data_dir) / DATABASE_NAME
        known = await trio.to_thread.run_sync(known_credentials, database)
        return credential_warnings(config, known)

    async def reload(self, *, dry_run: bool = False) -> ReloadOutcome:
        """Validate the config file whole, then apply it as a diff.

        An invalid file changes nothing: the running config stays active and
        the outcome carries every error with file and line.
        """
        async with self._reload_lock:
            if not dry_run:
                notify_systemd("RELOADING=1")
            try:
                return await self._reload(dry_run)
            finally:
                if not dry_run:
                    notify_systemd("READY=1")

    async def _reload(self, dry_run: bool) -> ReloadOutcome:
        config, errors, warnings = await trio.to_thread.run_sync(
            check_config, self.config_path
        )
        now = datetime.now(UTC)
        if config is None or errors:
            outcome = ReloadOutcome(
                False, dry_run, None, tuple(errors), tuple(warnings), now
            )
            if not dry_run:
                self.last_reload = outcome
                logger.error(
                    "reload failed, the previous config stays active:\n%s",
                    "\n".join(errors),
                )
                self.hub.publish(
                    ReloadEvent(
                        ok=False,
                        added=[],
                        removed=[],
                        changed=[],
                        unchanged=[],
                        error="\n".join(errors),
                        at=now,
                    )
                )
            return outcome
        warnings += await self._credential_warnings(config)
        for warning in warnings:
            logger.warning("config: %s", warning)
        assert self.manager is not None
        if dry_run:
            diff = self.manager.preview(config)
            return ReloadOutcome(
                True, True, diff, (), tuple(warnings), now, config=config
            )
        backend_changed = (
            config.credentials != self.config.credentials
            or config.runvisor.data_dir != self.config.runvisor.data_dir
        )
        if self._owns_credentials and backend_changed:
            self.credentials = await self._open_credentials(config)
            self.manager.context.credentials = self.credentials
        diff = await self.manager.apply(config)
        self.config = config
        outcome = ReloadOutcome(
            True, False, diff, (), tuple(warnings), now, config=config
        )
        self.last_reload = outcome
        self.hub.publish(
            ReloadEvent(
                ok=True,
                added=list(diff.added),
                removed=list(diff.removed),
                changed=list(diff.changed),
                unchanged=list(diff.unchanged),
                error="",
                at=now,
            )
        )
        return outcome
