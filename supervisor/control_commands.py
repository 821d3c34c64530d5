"""The commands that talk to the daemon, for the CLI and the shell.

Each handler takes the parsed arguments of `cli.build_parser` and returns an
exit code. It prints its result to `sys.stdout` at call time, so the shell
can run it in a worker thread with its output redirected above the prompt.
Errors are raised (`RunvisorError`, `DaemonNotRunning`) and turned into a
message and an exit code by `cli.run_handler`.

When no daemon runs, `status`, `history`, `logs` (without `-f`) and
`config show` read the store, the log files and the config file instead,
and print a note on stderr. `status` then exits 3, because the daemon is not
running; the others exit 0, because their answer is complete.

Heavy modules (the config loader, the store, tomlkit) are imported only by
the commands that need them, so that `status` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from supervisor.control import (
    Client,
    DaemonPaths,
    locate_config,
    locate_daemon,
    locate_socket,
)
from supervisor.errors import (
    ConfigError,
    ControlError,
    DaemonNotRunning,
    UnknownProject,
)
from supervisor.model import (
    CompletedEvent,
    LogEvent,
    ProjectState,
    ProjectStatus,
    RunRecord,
    RunStatus,
    StartedEvent,
)
from supervisor.protocol import (
    ActionReply,
    ConfigReply,
    ConfigShowRequest,
    EndReply,
    EventReply,
    EventsRequest,
    HistoryReply,
    HistoryRequest,
    LogLinesReply,
    LogsRequest,
    Message,
    ReloadReply,
    ReloadRequest,
    RestartRequest,
    ShutdownRequest,
    SkippedReply,
    StartRequest,
    StatusReply,
    StatusRequest,
    StopRequest,
    TriggerRequest,
)
from supervisor.render import (
    Style,
    color_enabled,
    format_event,
    format_log_line,
    is_terminal,
    local_time,
    now_utc,
    output_width,
    render_history,
    render_status,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3

ReplyType = TypeVar("ReplyType")


class Interrupter:
    """Lets another thread end the waits of the command that runs now, as
    the shell does on Ctrl-C. Thread-safe."""

    def __init__(self) -> None:
        self.interrupted = False
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    def register(self, client: Client) -> None:
        with self._lock:
            self._clients.append(client)
            if self.interrupted:
                client.interrupt()

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            for client in self._clients:
                client.interrupt()


def connect(args: argparse.Namespace) -> Client:
    """Connect to the daemon of the config that `args.config` selects."""
    client = Client.connect(socket_path(args))
    interrupter: Interrupter | None = getattr(args, "interrupter", None)
    if interrupter is not None:
        interrupter.register(client)
    return client


def socket_path(args: argparse.Namespace) -> Path:
    return locate_socket(locate_config(args.config))


def expect(reply: Message, kind: type[ReplyType]) -> ReplyType:
    if not isinstance(reply, kind):
        raise ControlError(
            f"The daemon replied with a {type(reply).__name__} where a "
            f"{kind.__name__} was expected. Use the same runvisor version for "
            "the daemon and the client."
        )
    return reply


def print_json(document: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.encode(document).decode() + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    print(f"runvisor: {text}", file=sys.stderr)


def _style() -> tuple[Style, int | None]:
    style = Style(color_enabled(sys.stdout), escape=is_terminal(sys.stdout))
    return style, output_width(sys.stdout)


def _no_daemon_note(error: DaemonNotRunning, fallback: str) -> None:
    note(f"{error}")
    note(fallback)


# status


def cmd_status(args: argparse.Namespace) -> int:
    try:
        client = connect(args)
    except DaemonNotRunning as error:
        _no_daemon_note(error, "Showing the last runs recorded in the store.")
        _status_offline(args)
        return EXIT_NO_DAEMON
    with client:
        reply = expect(client.request(StatusRequest(name=args.name)), StatusReply)
    if args.json:
        print_json({"daemon": reply.daemon, "projects": reply.projects})
        return EXIT_OK
    style, width = _style()
    for line in render_status(reply.projects, now_utc(), style, width):
        print(line)
    daemon = reply.daemon
    if daemon.last_reload is not None and not daemon.last_reload.ok:
        print()
        print(
            style.paint(
                f"The last reload ({local_time(daemon.last_reload.at)}) failed; "
                "the previous config is still active:",
                "red",
            )
        )
        for problem in daemon.last_reload.errors:
            print(f"  {problem}")
    if daemon.shutting_down:
        print(style.paint("The daemon is shutting down.", "yellow"))
    return EXIT_OK


def _status_offline(args: argparse.Namespace) -> None:
    config = _load_config(args)
    if args.name is not None and args.name not in config.projects:
        raise UnknownProject(args.name)
    last = _read_database(config, lambda database: database.last_runs(), {})
    names = [args.name] if args.name else list(config.projects)
    projects = [
        ProjectStatus(
            name=name,
            trigger=config.projects[name].trigger,
            state=ProjectState.STOPPED,
            reason="no daemon is running",
            last_run=last.get(name),
        )
        for name in names
    ]
    if args.json:
        print_json({"daemon": None, "projects": projects})
        return
    style, width = _style()
    for line in render_status(projects, now_utc(), style, width):
        print(line)


def _load_config(args: argparse.Namespace) -> Any:
    from supervisor.config import load_config

    return load_config(locate_config(args.config))


def _read_database(config: Any, read: Any, empty: Any) -> Any:
    """Run `read(database)` on the config's database, or return `empty`
    when the database does not exist yet (it is not created)."""
    from supervisor.boot import DATABASE_NAME
    from supervisor.database import Database

    path = Path(config.runvisor.data_dir) / DATABASE_NAME
    if not path.exists():
        return empty
    database = Database.open(path)
    try:
        return read(database)
    finally:
        database.close()


# trigger, start, stop, restart, shutdown


def _action(args: argparse.Namespace, request: Any, timeout: float | None) -> int:
    with connect(args) as client:
        reply = expect(client.request(request, timeout=timeout), ActionReply)
    print(reply.message)
    return EXIT_OK


def cmd_trigger(args: argparse.Namespace) -> int:
    return _action(args, TriggerRequest(name=args.name), 30.0)


def cmd_start(args: argparse.Namespace) -> int:
    return _action(args, StartRequest(name=args.name), 30.0)


def cmd_stop(args: argparse.Namespace) -> int:
    # A stop lasts up to the project's stop_timeout, so it waits without limit.
    return _action(args, StopRequest(name=args.name), None)


def cmd_restart(args: argparse.Namespace) -> int:
    return _action(args, RestartRequest(name=args.name), None)


def cmd_shutdown(args: argparse.Namespace) -> int:
    with connect(args) as client:
        reply = expect(client.request(ShutdownRequest()), ActionReply)
        print(reply.message, flush=True)
        # The daemon closes the connection once every run is over.
        while client.receive(None) is not None:
            pass
    pid = client.daemon_pid
    # It then writes the last history rows and exits. A `serve` started
    # right after this command returns should find it gone.
    exited = _wait_for_exit(pid, DAEMON_EXIT_WAIT_SECONDS)
    if exited is None:
        print(f"The daemon (pid {pid}) has stopped every project.")
    elif exited:
        print(f"The daemon (pid {pid}) has stopped every project and exited.")
    else:
        print(
            f"The daemon (pid {pid}) has stopped every project but has not "
            f"exited after {DAEMON_EXIT_WAIT_SECONDS:g} s; check it with "
            f"'ps -p {pid}'."
        )
    return EXIT_OK


# The daemon gives its last history rows up to 15 s at shutdown
# (SHUTDOWN_WRITE_TIMEOUT in supervisor.store, not imported here: the
# CLI does not load the store).
DAEMON_EXIT_WAIT_SECONDS = 20.0


def _wait_for_exit(pid: int, timeout: float) -> bool | None:
    """Wait until process `pid` is gone (or a zombie); return whether it
    went within `timeout`, or None when it belongs to another user."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return None
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                if file.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return True
        except (OSError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


# history


def parse_since(text: str) -> datetime:
    """Read `--since`: an ISO 8601 time (local time when it has no offset)
    or a duration back from now, such as "30m", "2h" or "7d"."""
    from supervisor.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        if seconds >= 0:
            try:
                return now_utc() - timedelta(seconds=seconds)
            except OverflowError:
                raise argparse.ArgumentTypeError(
                    f"{text} reaches back before the year 1: use a shorter duration"
                ) from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time such as 2026-01-05T12:00 nor a "
            "duration such as 30m, 2h or 7d"
        ) from None
    if moment.tzinfo is None:
        try:
            moment = moment.astimezone()
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: give a time from the year 2 to 9998 "
                "or an offset such as +00:00"
            ) from None
    return moment


def cmd_history(args: argparse.Namespace) -> int:
    status = RunStatus(args.status) if args.status else None
    try:
        client = connect(args)
    except DaemonNotRunning as error:
        _no_daemon_note(error, "Reading the history from the store.")
        runs = _history_offline(args, status)
    else:
        with client:
            request = HistoryRequest(
                name=args.name, limit=args.limit, status=status, since=args.since
            )
            runs = expect(client.request(request), HistoryReply).runs
    if args.json:
        print_json(runs)
        return EXIT_OK
    style, width = _style()
    for line in render_history(runs, style, width):
        print(line)
    return EXIT_OK


def _history_offline(
    args: argparse.Namespace, status: RunStatus | None
) -> list[RunRecord]:
    config = _load_config(args)
    if args.name is not None:
        _check_offline_project(config, args.name)

    def read(database: Any) -> list[RunRecord]:
        runs: list[RunRecord] = database.history(
            args.name, limit=args.limit, status=status, since=args.since
        )
        return runs

    result: list[RunRecord] = _read_database(config, read, [])
    return result


def _check_offline_project(config: Any, name: str) -> None:
    """Accept a project of the config, or one that left it but still has
    runs in the store.

    Raises:
        UnknownProject: the project is in neither.
    """
    if name in config.projects:
        return
    if not _read_database(config, lambda database: database.history(name, limit=1), []):
        raise UnknownProject(name)


# logs


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        client = connect(args)
    except DaemonNotRunning as error:
        if args.follow:
            raise
        _no_daemon_note(error, "Reading the log file directly.")
        return _logs_offline(args)
    style, _ = _style()
    request = LogsRequest(
        name=args.name, run_id=args.run_id, follow=args.follow, tail=args.tail
    )
    ended = False
    with client:
        for message in client.stream(request):
            match message:
                case LogLinesReply():
                    for line in message.lines:
                        if args.json:
                            print_json(
                                {
                                    "project": message.project,
                                    "run_id": message.run_id,
                                    "at": line.at,
                                    "stream": line.stream,
                                    "text": line.text,
                                }
                            )
                        else:
                            print(
                                format_log_line(line.at, line.stream, line.text, style)
                            )
                case EventReply(event=event):
                    _print_followed(event, args.json, style)
                case SkippedReply(count=count):
                    note(f"{count} lines skipped: this client read too slowly.")
                case EndReply(message=text):
                    ended = True
                    if text and not args.json:
                        print(style.paint(f"-- {style.text(text)}", "dim"))
            sys.stdout.flush()
    if not ended:
        return _daemon_went_away()
    return EXIT_OK


def _daemon_went_away() -> int:
    """Report a stream that the daemon closed before its end."""
    note(
        "The daemon closed the connection: it stopped or restarted. "
        "Run the command again once it is back."
    )
    return EXIT_NO_DAEMON


def _print_followed(event: Any, as_json: bool, style: Style) -> None:
    if as_json:
        print_json(event)
        return
    if isinstance(event, LogEvent):
        print(format_log_line(event.at, event.stream, event.text, style))
    elif isinstance(event, StartedEvent):
        print(
            style.paint(
                f"-- run {event.run_id} started ({event.trigger}), pid {event.pid}",
                "dim",
            )
        )
    elif isinstance(event, CompletedEvent):
        reason = f": {style.text(event.reason)}" if event.reason else ""
        print(style.paint(f"-- run {event.run_id} {event.status}{reason}", "dim"))


def _logs_offline(args: argparse.Namespace) -> int:
    from supervisor.logs import read_run_log, run_log_path

    config = _load_config(args)
    _check_offline_project(config, args.name)
    run_id = args.run_id
    if run_id is None:
        runs = _read_database(
            config, lambda database: database.history(args.name, limit=1), []
        )
        if not runs:
            return EXIT_OK
        run_id = runs[0].id
    logs_dir = Path(config.runvisor.data_dir) / "logs"
    style, _ = _style()
    for record in read_run_log(run_log_path(logs_dir, args.name, run_id), args.tail):
        if args.json:
            print_json(
                {
                    "project": args.name,
                    "run_id": run_id,
                    "at": record.at,
                    "stream": record.stream,
                    "text": record.text,
                }
            )
        else:
            print(format_log_line(record.at, record.stream, record.text, style))
    return EXIT_OK


# events


def cmd_events(args: argparse.Namespace) -> int:
    request = EventsRequest(
        projects=list(args.names), log_projects=[] if args.no_logs else None
    )
    style, _ = _style()
    with connect(args) as client:
        for message in client.stream(request):
            match message:
                case EventReply(event=event):
                    if args.json:
                        print_json(event)
                    else:
                        print(format_event(event, style), flush=True)
                case SkippedReply(count=count):
                    note(f"{count} events skipped: this client read too slowly.")
    # The stream has no end of its own: it ends when the daemon goes away.
    return _daemon_went_away()


# config show, config set, reload


def cmd_config_show(args: argparse.Namespace) -> int:
    try:
        client = connect(args)
    except DaemonNotRunning as error:
        _no_daemon_note(error, "Showing the settings of the config file.")
        source, settings = _config_offline(args)
    else:
        with client:
            reply = expect(
                client.request(ConfigShowRequest(name=args.name)), ConfigReply
            )
        source, settings = reply.source, reply.settings
    if args.json:
        print_json({"source": source, **settings})
        return EXIT_OK
    import tomlkit

    shown = _without_none(settings)
    for project in shown.get("projects", {}).values():
        project.pop("name", None)  # the table's key already
    print(f"# effective settings of {source}, defaults filled in, secrets masked")
    print(tomlkit.dumps(shown).rstrip("\n"))
    return EXIT_OK


def _config_offline(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from supervisor.config import effective_settings, format_size

    config = _load_config(args)
    if args.name is not None and args.name not in config.projects:
        raise UnknownProject(args.name)
    names = [args.name] if args.name else list(config.projects)
    daemon = config.runvisor
    settings = {
        "runvisor": {
            "data_dir": daemon.data_dir,
            "socket": daemon.socket,
            "log_max_bytes": format_size(daemon.log_max_bytes),
            "log_backups": daemon.log_backups,
            "history_keep": daemon.history_keep,
            "log_level": daemon.log_level,
        },
        "credentials": {"backend": config.credentials.backend},
        "projects": {name: effective_settings(config.projects[name]) for name in names},
    }
    return config.source, settings


def _without_none(value: Any) -> Any:
    """Prepare settings for TOML, which has no null: leave out None values
    and empty tables."""
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            item = _without_none(item)
            if item is not None and item != {}:
                kept[key] = item
        return kept
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def cmd_config_set(args: argparse.Namespace) -> int:
    from supervisor.config_edit import set_value

    path = locate_config(args.config)
    before = locate_daemon(path)
    change = set_value(
        path,
        args.key,
        args.value,
        before_write=lambda change: _check_daemon_paths(path, before, change),
    )
    print(f"{path}: {change.key} = {_toml_value(change.new)}")
    try:
        client = connect(args)
    except DaemonNotRunning:
        note(f"not reloaded: no daemon is running on {socket_path(args)}.")
        return EXIT_OK
    with client:
        status = expect(client.request(StatusRequest()), StatusReply)
        if Path(status.daemon.config_path).resolve() != path.resolve():
            note(
                f"The daemon runs {status.daemon.config_path}, not {path}, so it "
                "was not reloaded."
            )
            return EXIT_OK
        reply = expect(client.request(ReloadRequest(), timeout=None), ReloadReply)
    return _print_reload(reply, as_json=False)


def _check_daemon_paths(path: Path, before: DaemonPaths, change: Any) -> None:
    """Reject a new socket or data dir while the daemon of `path` runs.

    The daemon keeps both until it restarts, but clients would look for it
    at the new socket at once, so it could no longer be reached.
    """
    runvisor = change.config.runvisor
    after = DaemonPaths(socket=Path(runvisor.socket), data_dir=Path(runvisor.data_dir))
    moved = [
        key
        for key, old, new in zip(DaemonPaths._fields, before, after, strict=True)
        if old != new
    ]
    if not moved:
        return
    try:
        client = Client.connect(before.socket)
    except DaemonNotRunning:
        return
    with client:
        status = expect(client.request(StatusRequest()), StatusReply)
    if Path(status.daemon.config_path).resolve() != path.resolve():
        return
    key = f"runvisor.{moved[0]}"
    raise ConfigError(
        [
            f"{key} cannot change while the daemon (pid {status.daemon.pid}) "
            f"runs with {path}, because the daemon keeps its socket and data "
            "dir until it restarts and the CLI would no longer find it. Stop "
            "the daemon with 'runvisor shutdown', run this 'config set' again, "
            f"then start it with 'runvisor serve'. {path} is unchanged."
        ]
    )


def _toml_value(value: object) -> str:
    import tomlkit

    return tomlkit.item(value).as_string()


def cmd_reload(args: argparse.Namespace) -> int:
    with connect(args) as client:
        reply = expect(
            client.request(ReloadRequest(dry_run=args.dry_run), timeout=None),
            ReloadReply,
        )
    return _print_reload(reply, as_json=args.json)


def _print_reload(reply: ReloadReply, *, as_json: bool) -> int:
    if as_json:
        print_json(reply)
        return EXIT_OK if reply.ok else EXIT_FAILED
    for warning in reply.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not reply.ok:
        print("Reload failed; the previous config stays active:", file=sys.stderr)
        for error in reply.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_FAILED
    restarted = [name for name in reply.changed if name not in reply.updated]
    lines = [
        ("start", reply.added),
        ("stop", reply.removed),
        ("restart", restarted),
        ("update", reply.updated),
        ("keep", reply.unchanged),
    ]
    print("Dry run, nothing changed:" if reply.dry_run else "Reloaded:")
    for action, names in lines:
        if names:
            print(f"  {action:<8} {', '.join(names)}")
    if not any(names for _, names in lines):
        print("  no projects are configured")
    if reply.updated:
        print(
            "Updated projects are not restarted: their next run uses the new settings."
        )
    if reply.settings_changed:
        print(
            "[runvisor] or [credentials] changed; a new socket path takes "
            "effect when the daemon restarts."
        )
    return EXIT_OK
