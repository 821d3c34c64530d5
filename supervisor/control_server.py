"""The daemon's end of the control socket: the server that handles requests.

The listening socket comes from `control_socket.open_control_socket`, which
this module re-exports for the daemon. `ControlServer` serves it with
`trio.serve_listeners`. Each connection is checked with SO_PEERCRED: a
process of another user gets an error reply and is disconnected. A
malformed or oversized frame ends only its own connection, with an error
reply. Live streams (`events`, `logs -f`) read from a bounded `Hub`
subscription, so a slow client skips events (and is told how many) and
never slows a run.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from supervisor import __version__
from supervisor.config import effective_settings, format_size
from supervisor.control_socket import ControlSocket, open_control_socket
from supervisor.errors import ProtocolError, RunvisorError, UnknownProject
from supervisor.logs import LogRecord, Skipped, read_run_log, run_log_path
from supervisor.model import (
    CompletedEvent,
    Event,
    LogEvent,
    RunRecord,
    StartedEvent,
    TriggerMode,
)
from supervisor.protocol import (
    ActionReply,
    ConfigReply,
    ConfigShowRequest,
    DaemonInfo,
    EndReply,
    ErrorKind,
    ErrorReply,
    EventReply,
    EventsRequest,
    FrameReader,
    HistoryReply,
    HistoryRequest,
    LogLine,
    LogLinesReply,
    LogsRequest,
    Message,
    ReloadReply,
    ReloadRequest,
    ReloadState,
    Request,
    RestartRequest,
    ShutdownRequest,
    SkippedReply,
    StartRequest,
    StatusReply,
    StatusRequest,
    StopRequest,
    TriggerRequest,
    encode_frame,
)

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.runner import ProjectRunner, TriggerResult

logger = logging.getLogger(__name__)

__all__ = ["ControlServer", "ControlSocket", "open_control_socket"]

DISCARD_SECONDS = 1.0
"""Seconds a rejected connection is read from before it is closed."""
EVENT_QUEUE = 1024
"""Events queued per live subscriber before it starts to skip."""
LOG_QUEUE = 4096
"""Log lines queued per `logs -f` client before it starts to skip."""
FOLLOW_TAIL = 10
"""Stored lines sent before live ones by `logs -f` without `--tail`."""
LINES_PER_FRAME_BYTES = 1024 * 1024
"""Text bytes of stored log lines per frame, far below the frame limit."""
STORED_RUNS_SECONDS = 1.0
"""How long `status` reuses the last runs it read from the store."""

_REQUEST_TYPES = typing.get_args(Request)
_PEERCRED = struct.Struct("3i")


# One connection


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader()
        self.closed_by_peer = False

    async def receive(self) -> Message | None:
        """Return the next message, or None at the end of the connection.

        Raises ProtocolError for an oversized, truncated or invalid frame.
        """
        while True:
            message = self.reader.next_message()
            if message is not None:
                return message
            if not await self.fill():
                self.reader.check_complete()
                return None

    async def fill(self) -> bool:
        """Read more bytes into the reader; False at the end of the stream."""
        data = await self.stream.receive_some(64 * 1024)
        if not data:
            self.closed_by_peer = True
            return False
        self.reader.feed(data)
        return True

    async def send(self, message: Message) -> None:
        await self.stream.send_all(encode_frame(message))


# The server


class ControlServer:
    """Serves control requests for a running daemon.

    `allowed_uid` is the only user id that may connect; it defaults to the
    daemon's own.
    """

    def __init__(self, daemon: Daemon, *, allowed_uid: int | None = None) -> None:
        self.daemon = daemon
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self._stored_last_runs: dict[str, RunRecord] = {}
        self._stored_last_runs_at = -math.inf

    async def serve(
        self,
        control: ControlSocket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on `control` until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(control.sock))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, [listener])
            task_status.started()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. Raises nothing but cancellation, because a
        client must not be able to take the daemon down."""
        async with stream:
            try:
                data = stream.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
                )
                pid, uid, _ = _PEERCRED.unpack(data)
                connection = _Connection(stream)
                if uid != self.allowed_uid:
                    logger.warning(
                        "rejected a control connection from pid %d of user id %d",
                        pid,
                        uid,
                    )
                    await connection.send(
                        ErrorReply(
                            message="Permission denied: only the user who runs "
                            "the daemon may control it.",
                            kind=ErrorKind.PERMISSION_DENIED,
                        )
                    )
                    await _discard_input(stream)
                    return
                await self._serve_connection(connection)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            except Exception:
                logger.exception("internal error on a control connection")

    async def _serve_connection(self, connection: _Connection) -> None:
        while True:
            try:
                request = await connection.receive()
            except ProtocolError as error:
                logger.warning("closing a control connection: %s", error)
                await connection.send(
                    ErrorReply(message=str(error), kind=ErrorKind.BAD_REQUEST)
                )
                return
            if request is None:
                return
            if not isinstance(request, _REQUEST_TYPES):
                await connection.send(
                    ErrorReply(
                        id=request.id,
                        message=f"Expected a request, not a {type(request).__name__}.",
                        kind=ErrorKind.BAD_REQUEST,
                    )
                )
                return
            await self._dispatch(connection, request)
            if connection.closed_by_peer:
                return

    async def _dispatch(self, connection: _Connection, request: Request) -> None:
        try:
            reply = await self._answer(connection, request)
        except UnknownProject as error:
            reply = ErrorReply(message=str(error), kind=ErrorKind.UNKNOWN_PROJECT)
        except RunvisorError as error:
            reply = ErrorReply(message=str(error))
        except Exception:
            logger.exception("internal error while handling %s", request)
            reply = ErrorReply(
                message=f"The daemon failed to handle the {type(request).__name__} "
                "because of an internal error; see the daemon log."
            )
        if reply is not None:
            reply.id = request.id
            await connection.send(reply)

    async def _answer(
        self, connection: _Connection, request: Request
    ) -> Message | None:
        """Return the reply to send, or None when a stream already sent it."""
        daemon = self.daemon
        manager = daemon.manager
        assert manager is not None
        if daemon.shutting_down and isinstance(
            request, TriggerRequest | StartRequest | RestartRequest | ReloadRequest
        ):
            return ErrorReply(
                message="The daemon is shutting down, so it starts nothing new.",
                kind=ErrorKind.SHUTTING_DOWN,
            )
        match request:
            case StatusRequest(name=name):
                return await self._status(name)
            case TriggerRequest(name=name):
                return _action_reply(manager.trigger(name))
            case StartRequest(name=name):
                return _action_reply(manager.start(name))
            case RestartRequest(name=name):
                return _action_reply(await manager.restart(name))
            case StopRequest(name=name):
                await manager.stop(name)
                return ActionReply(message=f"Stopped {name!r}.", outcome="stopped")
            case HistoryRequest():
                return await self._history(request)
            case ConfigShowRequest(name=name):
                return self._config_show(name)
            case ReloadRequest(dry_run=dry_run):
                return await self._reload(dry_run)
            case LogsRequest():
                await self._logs(connection, request)
                return None
            case EventsRequest():
                await self._events(connection, request)
                return None
            case ShutdownRequest():
                await self._shutdown(connection, request)
                return None
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    # -- quick requests -----------------------------------------------------

    async def _status(self, name: str | None) -> StatusReply:
        daemon = self.daemon
        assert daemon.manager is not None and daemon.store is not None
        projects = daemon.manager.status(name)
        if any(project.last_run is None for project in projects):
            # Runs of an earlier daemon are known only to the store. They
            # change rarely (a skipped fire), so one read serves the status
            # requests of the next second, which keeps status polling cheap.
            now = trio.current_time()
            if now - self._stored_last_runs_at > STORED_RUNS_SECONDS:
                self._stored_last_runs = await daemon.store.last_runs()
                self._stored_last_runs_at = now
            for project in projects:
                if project.last_run is None:
                    project.last_run = self._stored_last_runs.get(project.name)
        last = daemon.last_reload
        return StatusReply(
            projects=projects,
            daemon=DaemonInfo(
                pid=os.getpid(),
                version=__version__,
                config_path=str(daemon.config_path),
                started_at=daemon.started_at,
                last_reload=None
                if last is None
                else ReloadState(ok=last.ok, at=last.at, errors=list(last.errors)),
                shutting_down=daemon.shutting_down,
            ),
        )

    async def _history(self, request: HistoryRequest) -> HistoryReply:
        daemon = self.daemon
        assert daemon.manager is not None and daemon.store is not None
        if request.name is not None:
            await self._runner_or_history(request.name)
        with trio.move_on_after(2):
            await daemon.store.flush()
        runs = await daemon.store.history(
            request.name,
            limit=request.limit,
            status=request.status,
            since=request.since,
        )
        return HistoryReply(runs=runs)

    def _config_show(self, name: str | None) -> ConfigReply:
        config = self.daemon.config
        if name is not None and name not in config.projects:
            raise UnknownProject(name)
        names = [name] if name is not None else list(config.projects)
        daemon_settings: dict[str, object] = {
            "data_dir": config.runvisor.data_dir,
            "socket": config.runvisor.socket,
            "log_max_bytes": format_size(config.runvisor.log_max_bytes),
            "log_backups": config.runvisor.log_backups,
            "history_keep": config.runvisor.history_keep,
            "log_level": config.runvisor.log_level,
        }
        return ConfigReply(
            source=config.source,
            settings={
                "runvisor": daemon_settings,
                "credentials": {"backend": config.credentials.backend},
                "projects": {
                    key: effective_settings(config.projects[key]) for key in names
                },
            },
        )

    async def _reload(self, dry_run: bool) -> ReloadReply:
        old = self.daemon.config
        outcome = await self.daemon.reload(dry_run=dry_run)
        if not outcome.ok or outcome.diff is None or outcome.config is None:
            return ReloadReply(
                ok=False,
                dry_run=dry_run,
                errors=list(outcome.errors),
                warnings=list(outcome.warnings),
            )
        diff = outcome.diff
        new = outcome.config
        updated = [
            name
            for name in diff.changed
            if not restarts_on_change(
                old.projects[name].trigger, new.projects[name].trigger
            )
        ]
        return ReloadReply(
            ok=True,
            dry_run=dry_run,
            added=list(diff.added),
            removed=list(diff.removed),
            changed=list(diff.changed),
            updated=updated,
            unchanged=list(diff.unchanged),
            settings_changed=diff.settings_changed,
            warnings=list(outcome.warnings),
        )

    async def _shutdown(
        self, connection: _Connection, request: ShutdownRequest
    ) -> None:
        await connection.send(
            ActionReply(
                id=request.id,
                message="Shutting down: stopping every project.",
                outcome="stopping",
            )
        )
        self.daemon.request_shutdown()
        # The connection stays open until the daemon cancels the server
        # after every run is over; the client waits for that close.
        await trio.sleep_forever()

    # -- streams ------------------------------------------------------------

    async def _events(self, connection: _Connection, request: EventsRequest) -> None:
        manager = self.daemon.manager
        assert manager is not None
        for name in [*request.projects, *(request.log_projects or [])]:
            manager.runner(name)
        projects = set(request.projects)
        log_projects = (
            None if request.log_projects is None else set(request.log_projects)
        )

        def where(event: Event) -> bool:
            project = getattr(event, "project", None)
            if project is None:
                return True  # reload events concern every project
            if projects and project not in projects:
                return False
            if isinstance(event, LogEvent):
                return log_projects is None or project in log_projects
            return True

        with self.daemon.hub.subscribe(EVENT_QUEUE, where=where) as subscription:
            await connection.send(
                ActionReply(
                    id=request.id,
                    message="Subscribed to live events.",
                    outcome="subscribed",
                )
            )

            async def push_events() -> None:
                while True:
                    item = await subscription.receive()
                    await connection.send(_push(request.id, item))

            await _stream(connection, push_events)

    async def _logs(self, connection: _Connection, request: LogsRequest) -> None:
        manager = self.daemon.manager
        assert manager is not None
        runner = await self._runner_or_history(request.name)
        run_id = request.run_id
        if run_id is None:
            run_id = await self._latest_run_id(request.name, runner)
        else:
            await self._check_run(request.name, run_id)
        logs_dir = manager.context.logs_dir
        path = None if run_id is None else run_log_path(logs_dir, request.name, run_id)
        tail = request.tail
        if request.follow and tail is None:
            tail = FOLLOW_TAIL

        if not request.follow or runner is None:
            records = []
            if path is not None:
                records = await trio.to_thread.run_sync(read_run_log, path, tail)
            await _send_lines(connection, request, run_id, records)
            end_message = ""
            if request.follow:
                end_message = (
                    f"Project {request.name!r} is no longer in the config, so no "
                    "new output follows."
                )
            await connection.send(EndReply(id=request.id, message=end_message))
            return

        one_run = request.run_id is not None

        def where(event: Event) -> bool:
            if getattr(event, "project", None) != request.name:
                return False
            if one_run:
                is_run_event = isinstance(event, LogEvent | CompletedEvent)
                return is_run_event and getattr(event, "run_id", None) == run_id
            return isinstance(event, LogEvent | StartedEvent | CompletedEvent)

        with self.daemon.hub.subscribe(LOG_QUEUE, where=where) as subscription:
            # Subscribing and reading the stored lines happen with no
            # checkpoint in between, so each line is sent once: earlier lines
            # are in the file and later ones arrive in the queue. `tail`
            # bounds this read, which blocks the event loop.
            records = [] if path is None else read_run_log(path, tail)
            ended = one_run and run_id not in runner.runs
            await _send_lines(connection, request, run_id, records)
            if ended:
                await connection.send(
                    EndReply(id=request.id, message=f"Run {run_id} has ended.")
                )
                return

            async def push_lines() -> None:
                while True:
                    item = await subscription.receive()
                    await connection.send(_push(request.id, item))
                    if one_run and isinstance(item, CompletedEvent):
                        await connection.send(
                            EndReply(id=request.id, message=f"Run {run_id} has ended.")
                        )
                        return

            await _stream(connection, push_lines)

    async def _runner_or_history(self, name: str) -> ProjectRunner | None:
        """Return the runner of `name`, or None for a project that left the
        config but still has runs in the store.

        Raises:
            UnknownProject: the project is in neither.
        """
        assert self.daemon.manager is not None and self.daemon.store is not None
        try:
            return self.daemon.manager.runner(name)
        except UnknownProject:
            pass
        with trio.move_on_after(2):
            await self.daemon.store.flush()
        if not await self.daemon.store.history(name, limit=1):
            raise UnknownProject(name) from None
        return None

    async def _latest_run_id(
        self, name: str, runner: ProjectRunner | None
    ) -> int | None:
        if runner is not None:
            status = runner.status()
            if status.run_id is not None:
                return status.run_id
            if runner.last_run is not None:
                return runner.last_run.id
        assert self.daemon.store is not None
        runs = await self.daemon.store.history(name, limit=1)
        return runs[0].id if runs else None

    async def _check_run(self, name: str, run_id: int) -> None:
        assert self.daemon.store is not None
        with trio.move_on_after(2):
            await self.daemon.store.flush()
        record = await self.daemon.store.get_run(run_id)
        if record is None or record.project != name:
            raise RunvisorError(
                f"Project {name!r} has no run {run_id}. Run 'runvisor history "
                f"{name}' to list its runs."
            )


async def _discard_input(stream: trio.SocketStream) -> None:
    """Read and drop what the peer sends until it closes, for a short while.

    Closing a Unix socket with unread input resets the connection, and the
    peer may then lose the reply that was sent before the close.
    """
    await stream.send_eof()
    with trio.move_on_after(DISCARD_SECONDS):
        while await stream.receive_some(64 * 1024):
            pass


def restarts_on_change(old: TriggerMode, new: TriggerMode) -> bool:
    """Tell whether a reload restarts a changed project, as the manager does.

    Always-running projects and projects whose trigger mode changed restart.
    The others keep running and use the new settings from their next run.
    """
    return old != new or new == TriggerMode.ALWAYS_RUNNING


def _action_reply(result: TriggerResult) -> ActionReply:
    return ActionReply(
        message=result.message, outcome=str(result.outcome), run_id=result.run_id
    )


def _push(request_id: int, item: Event | Skipped) -> Message:
    if isinstance(item, Skipped):
        return SkippedReply(id=request_id, count=item.count)
    return EventReply(id=request_id, event=item)


async def _send_lines(
    connection: _Connection,
    request: LogsRequest,
    run_id: int | None,
    records: list[LogRecord],
) -> None:
    if run_id is None:
        return
    batch: list[LogLine] = []
    size = 0
    for record in records:
        batch.append(LogLine(record.at, record.stream, record.text))
        size += len(record.text) + 32
        if size >= LINES_PER_FRAME_BYTES:
            await connection.send(
                LogLinesReply(
                    id=request.id, project=request.name, run_id=run_id, lines=batch
                )
            )
            batch, size = [], 0
    await connection.send(
        LogLinesReply(id=request.id, project=request.name, run_id=run_id, lines=batch)
    )


async def _stream(connection: _Connection, push: Callable[[], Awaitable[None]]) -> None:
    """Run `push` until it returns or the client closes the connection or
    sends anything (a new request ends the stream)."""
    async with trio.open_nursery() as nursery:

        async def watch_client() -> None:
            try:
                await connection.fill()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                connection.closed_by_peer = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_client)
        try:
            await push()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            connection.closed_by_peer = True
        nursery.cancel_scope.cancel()
