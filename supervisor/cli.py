"""Command-line entry point: argument parsing, logging setup, commands.

`runvisor --version` and `--help` import nothing heavy: every command
imports what it needs when it runs. The commands that talk to the daemon are
in `control_commands`, and the shell (`repl`) runs them from this same
parser, which also drives its completion.

Exit codes: 0 success, 1 the request failed, 2 usage error, 3 no daemon.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.limits import MAX_HISTORY_LIMIT, MAX_NEXT_COUNT, MAX_RUN_ID, MAX_TAIL

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3

Handler = Callable[[argparse.Namespace], int]


def setup_logging(level: str = "info") -> None:
    """Configure the daemon's own log on stderr, once."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def print_json(document: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.encode(document).decode() + "\n")


def _load_config(args: argparse.Namespace) -> Any:
    from supervisor.config import find_config_path, load_config

    return load_config(find_config_path(args.config))


# -- commands ---------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from supervisor.deferred import defer

    # Before anything imports trio or sqlite-utils.
    defer()
    from supervisor.boot import KeptSignals, boot

    signals = KeptSignals()
    from supervisor.config import find_config_path, load_config
    from supervisor.errors import ConfigError, StoreError

    path = find_config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"runvisor: invalid config, not starting:\n{error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        # The always-running projects start while trio and the daemon's
        # modules are imported.
        booted = boot(config, signals)
    except StoreError as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        import trio

        from supervisor.daemon import Daemon

        daemon = Daemon(path, boot=booted)
        setup_logging(args.log_level or config.runvisor.log_level)
        # What is loaded by now (modules, the config) lives as long as the
        # daemon. Frozen, it is left out of the garbage collector's full
        # passes, which took about 20 ms each and fell into bursts of run
        # starts.
        gc.freeze()
        trio.run(daemon.serve)
    except StoreError as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        booted.close()
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from supervisor.config import check_config, find_config_path

    path = Path(args.path) if args.path else find_config_path(args.config)
    config, errors, warnings = check_config(path)
    if config is not None:
        warnings += _credential_warnings(config)
    if getattr(args, "json", False):
        print_json({"ok": not errors, "errors": errors, "warnings": warnings})
        return EXIT_FAILED if errors else EXIT_OK
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if errors:
        for error in errors:
            print(error)
        return EXIT_FAILED
    print("ok")
    return EXIT_OK


def _credential_warnings(config: Any) -> list[str]:
    """Warn about mappings to credentials that the index does not hold."""
    from supervisor.boot import DATABASE_NAME
    from supervisor.credentials import credential_warnings, known_credentials
    from supervisor.errors import StoreError

    database = Path(config.runvisor.data_dir) / DATABASE_NAME
    try:
        known = known_credentials(database)
    except StoreError as error:
        return [f"cannot check credential nicknames: {error}"]
    return credential_warnings(config, known)


def cmd_next(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from supervisor.cron import CronSchedule
    from supervisor.model import TriggerMode

    config = _load_config(args)
    project = config.projects.get(args.name)
    if project is None:
        print(f"runvisor: project {args.name!r} is not in the config.", file=sys.stderr)
        return EXIT_FAILED
    if project.trigger != TriggerMode.SCHEDULE or project.cron is None:
        print(
            f"runvisor: project {args.name!r} has no schedule "
            f"(trigger = {project.trigger}).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    schedule = CronSchedule(project.cron, project.timezone)
    after = args.after or datetime.now(UTC)
    if after.tzinfo is None:
        after = after.replace(tzinfo=schedule.tzinfo)
    try:
        times = schedule.next_times(after, args.count)
    except OverflowError:
        print(
            f"runvisor: cannot list the fire times of {args.name!r} after "
            f"{after.isoformat()}: they reach past the dates Python can hold "
            "(years 1 to 9999). Give another --after or a smaller N.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.json:
        print_json(
            {
                "project": args.name,
                "cron": project.cron,
                "timezone": schedule.timezone_name,
                "description": schedule.describe(),
                "next": [t.isoformat() for t in times],
            }
        )
        return EXIT_OK
    print(f"{args.name}: {project.cron}  ({schedule.describe()})")
    local_title = schedule.timezone_name
    width = max([len(local_title), *(len(when.isoformat()) for when in times)])
    print(f"{local_title:<{width}}  UTC")
    for when in times:
        utc = when.astimezone(UTC).isoformat().replace("+00:00", "Z")
        print(f"{when.isoformat():<{width}}  {utc}")
    return EXIT_OK


# Distributions whose versions `runvisor version --verbose` prints.
REPORTED_LIBRARIES = (
    "trio",
    "croniter",
    "keyring",
    "sqlite-utils",
    "msgspec",
    "prompt_toolkit",
    "platformdirs",
    "tomlkit",
    "h11",
    "cryptography",
    "cron-descriptor",
)


def cmd_version(args: argparse.Namespace) -> int:
    if not (args.verbose or args.json):
        print(f"runvisor {__version__}")
        return EXIT_OK

    import platform
    from importlib import metadata

    from keyring.backend import get_all_keyring

    libraries: dict[str, str | None] = {}
    for name in REPORTED_LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    # Every backend keyring can use here: those whose priority check passes.
    backends = sorted(get_all_keyring(), key=lambda ring: -ring.priority)
    frozen = bool(getattr(sys, "frozen", False))
    if args.json:
        print_json(
            {
                "runvisor": __version__,
                "python": platform.python_version(),
                "frozen": frozen,
                "libraries": libraries,
                "keyring_backends": [
                    {"class": _class_path(ring), "priority": ring.priority}
                    for ring in backends
                ],
            }
        )
        return EXIT_OK

    print(f"runvisor {__version__}")
    build = "single executable" if frozen else sys.executable
    print(f"Python {platform.python_version()} ({build})")
    print("libraries:")
    for name, version in libraries.items():
        print(f"  {name:<16} {version or 'not installed'}")
    print("keyring backends (priority, class):")
    for ring in backends:
        print(f"  {ring.priority:>4g}  {_class_path(ring)}")
    return EXIT_OK


def _class_path(instance: object) -> str:
    kind = type(instance)
    return f"{kind.__module__}.{kind.__qualname__}"


def cmd_creds(args: argparse.Namespace) -> int:
    from supervisor.credential_commands import run_command

    return run_command(args)


# -- parser -------------------------------------------------------------------


def add_creds_commands(commands: Any) -> None:
    """Add `creds list|add|update|get|delete|backend` to the subcommands."""
    creds = commands.add_parser(
        "creds",
        help="manage global credentials (secrets in the OS keychain or the "
        "encrypted file store)",
        description="Manage global credentials. A secret is read with hidden "
        "input on a terminal, or from standard input when it is not a terminal "
        "(one trailing newline is removed); never from an argument.",
    )
    creds.set_defaults(handler=cmd_creds)
    actions = creds.add_subparsers(dest="creds_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser(
        "list",
        help="nicknames, descriptions, times and the projects that map each "
        "(never the secrets)",
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document")

    add = actions.add_parser("add", help="store a new credential")
    add.add_argument("name", help="nickname: letters, digits, '_', '.' or '-'")
    add.add_argument("--description", metavar="TEXT", help="what the secret is for")

    update = actions.add_parser("update", help="replace a credential's secret")
    update.add_argument("name")
    update.add_argument("--description", metavar="TEXT", help="a new description")
    update.add_argument(
        "--keep-secret",
        action="store_true",
        help="change only the description, without reading a new secret",
    )

    get = actions.add_parser(
        "get",
        help="print a credential's secret to standard output, byte for byte "
        "(this prints a secret)",
    )
    get.add_argument("name")

    delete = actions.add_parser("delete", help="delete a credential")
    delete.add_argument("name")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete it even when projects of the config map it",
    )

    backend = actions.add_parser(
        "backend",
        help="which backend stores the secrets, and where the file store's "
        "key comes from",
    )
    backend.add_argument("--json", action="store_true", help="print one JSON document")


# Kinds of values the shell completes an argument with, set on its action.
PROJECT = "project"
RUN_ID = "run_id"
CONFIG_KEY = "config_key"


def _completes(action: argparse.Action, kind: str) -> None:
    action.completion = kind  # type: ignore[attr-defined]


def _lazy(module: str, name: str) -> Handler:
    """A handler that imports its module only when the command runs."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        function: Handler = getattr(importlib.import_module(module), name)
        return function(args)

    handler.__name__ = name
    return handler


def _control(name: str) -> Handler:
    return _lazy("supervisor.control_commands", name)


def _parse_since(text: str) -> Any:
    from supervisor.control_commands import parse_since

    return parse_since(text)


def _whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    """Return an argparse type that reads a whole number from `low` to
    `high`; `what` names the number in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: {what} must be from {low:,} to {high:,}."
            )
        return value

    return parse


def _parse_after(text: str) -> Any:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-01-05T12:00 or "
            "2026-01-05T12:00+01:00"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    from supervisor.export.command import run_export

    return run_export(args)


def add_export_command(commands: Any) -> None:
    """Add `export FORMAT`, which writes what systemd, Kubernetes or Nomad
    run for the projects of the config."""
    export = commands.add_parser(
        "export",
        help="write systemd units, Kubernetes manifests or Nomad jobs for the projects",
    )
    export.add_argument("format", choices=["systemd", "kubernetes", "nomad"])
    export.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help="config file"
    )
    export.add_argument(
        "--out",
        metavar="DIR",
        help="write one file per project and kind into DIR (default: print "
        "every file to stdout)",
    )
    export.add_argument(
        "--project",
        metavar="NAME",
        nargs="+",
        action="extend",
        help="export only these projects (default: all)",
    )
    export.add_argument(
        "--k8s-source",
        choices=["configmap", "image"],
        default="configmap",
        help="kubernetes: ship the project folder in a ConfigMap, or expect it "
        "in the image given by --image (default: configmap)",
    )
    export.add_argument(
        "--image",
        metavar="NAME",
        help="kubernetes: container image (default for configmap: "
        "docker.io/library/python:3.11-slim)",
    )
    export.add_argument(
        "--k8s-secret",
        metavar="NAME",
        default="runvisor-credentials",
        help="kubernetes: Secret that holds the credentials (default: "
        "runvisor-credentials)",
    )
    export.set_defaults(handler=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runvisor",
        description="Keep script projects running: on demand, on a cron "
        "schedule, or always.",
    )
    parser.add_argument(
        "--version", action="version", version=f"runvisor {__version__}"
    )
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=cmd_serve)

    config = commands.add_parser("config", help="check or show the config")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument(
        "path", nargs="?", help="file to check (default: the active config)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON document")
    check.set_defaults(handler=cmd_config_check)
    show = config_commands.add_parser(
        "show",
        help="effective settings, defaults filled in and secrets masked (from "
        "the daemon, else from the file)",
    )
    _completes(show.add_argument("name", nargs="?"), PROJECT)
    show.add_argument("--json", action="store_true", help="print one JSON document")
    show.set_defaults(handler=_control("cmd_config_show"))
    set_ = config_commands.add_parser(
        "set",
        help="change one key in the config file, keeping its comments, then "
        "reload the daemon if one runs",
        description="Set NAME.KEY (such as web.restart, web.backoff.initial or "
        "web.env.LOG_LEVEL) to VALUE. VALUE is read as TOML when it is valid "
        'TOML (5, true, [0, 3], "text") and as a string otherwise (2s, '
        "on-failure). The new file is validated first: an invalid value "
        "leaves the file unchanged.",
    )
    _completes(set_.add_argument("key", metavar="NAME.KEY"), CONFIG_KEY)
    set_.add_argument("value", metavar="VALUE")
    set_.set_defaults(handler=_control("cmd_config_set"))

    status = commands.add_parser("status", help="state of all projects or one")
    _completes(status.add_argument("name", nargs="?"), PROJECT)
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(handler=_control("cmd_status"))

    history = commands.add_parser("history", help="run history, newest first")
    _completes(history.add_argument("name", nargs="?"), PROJECT)
    history.add_argument(
        "--limit",
        type=_whole_number(1, MAX_HISTORY_LIMIT, "the number of rows"),
        default=20,
        help="rows to show (default 20)",
    )
    history.add_argument(
        "--status",
        choices=[
            "running",
            "succeeded",
            "failed",
            "stopped",
            "timed_out",
            "skipped",
            "lost",
        ],
    )
    history.add_argument(
        "--since",
        metavar="TIME",
        type=_parse_since,
        help="only runs started at or after TIME: an ISO 8601 time (local "
        "time without an offset) or a duration back from now such as 2h or 7d",
    )
    history.add_argument("--json", action="store_true", help="print one JSON document")
    history.set_defaults(handler=_control("cmd_history"))

    for name, help_text, handler in (
        ("trigger", "start a run now", "cmd_trigger"),
        ("start", "start a stopped project or resume its schedule", "cmd_start"),
        ("stop", "stop a project's runs and keep it stopped", "cmd_stop"),
        ("restart", "stop a project, then start it", "cmd_restart"),
    ):
        action = commands.add_parser(name, help=help_text)
        _completes(action.add_argument("name"), PROJECT)
        action.set_defaults(handler=_control(handler))

    logs = commands.add_parser(
        "logs",
        help="output of a run (default: the current or latest run)",
        description="Print the log lines of a run. With -f, follow live "
        "output until Ctrl-C: without RUN_ID across every later run of the "
        "project, with RUN_ID until that run ends.",
    )
    _completes(logs.add_argument("name"), PROJECT)
    _completes(
        logs.add_argument(
            "run_id", nargs="?", type=_whole_number(1, MAX_RUN_ID, "a run id")
        ),
        RUN_ID,
    )
    logs.add_argument("-f", "--follow", action="store_true", help="follow live output")
    logs.add_argument(
        "--tail",
        metavar="N",
        type=_whole_number(0, MAX_TAIL, "the number of lines"),
        help="only the last N stored lines; 0 prints none, so with -f only "
        "new lines follow (with -f the default is 10)",
    )
    logs.add_argument("--json", action="store_true", help="print JSON lines")
    logs.set_defaults(handler=_control("cmd_logs"))

    reload = commands.add_parser(
        "reload",
        help="apply the config file's changes; an invalid file changes nothing",
    )
    reload.add_argument(
        "--dry-run",
        action="store_true",
        help="only print which projects would start, stop, restart or stay",
    )
    reload.add_argument("--json", action="store_true", help="print one JSON document")
    reload.set_defaults(handler=_control("cmd_reload"))

    events = commands.add_parser(
        "events",
        help="live events, one line each: started, log, completed, health, "
        "state, reload",
    )
    _completes(events.add_argument("names", metavar="NAME", nargs="*"), PROJECT)
    events.add_argument("--no-logs", action="store_true", help="leave out log lines")
    events.add_argument("--json", action="store_true", help="print JSON lines")
    events.set_defaults(handler=_control("cmd_events"))

    shutdown = commands.add_parser("shutdown", help="stop every project and the daemon")
    shutdown.set_defaults(handler=_control("cmd_shutdown"))

    shell = commands.add_parser(
        "shell", help="interactive shell attached to the running daemon"
    )
    shell.set_defaults(handler=_lazy("supervisor.repl", "cmd_shell"))
    up = commands.add_parser(
        "up", help="run the daemon with the shell attached, in one process"
    )
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    up.set_defaults(handler=_lazy("supervisor.repl", "cmd_up"))

    next_ = commands.add_parser("next", help="next fire times of a scheduled project")
    _completes(next_.add_argument("name"), PROJECT)
    next_.add_argument(
        "count",
        metavar="N",
        nargs="?",
        type=_whole_number(1, MAX_NEXT_COUNT, "the number of fire times"),
        default=5,
        help="default 5",
    )
    next_.add_argument(
        "--after",
        metavar="TIME",
        type=_parse_after,
        help="ISO 8601 instant to list from, in the project's time zone when "
        "it has no offset (default: now)",
    )
    next_.add_argument("--json", action="store_true", help="print one JSON document")
    next_.set_defaults(handler=cmd_next)

    version = commands.add_parser(
        "version", help="versions of runvisor and its libraries"
    )
    version.add_argument(
        "--verbose",
        action="store_true",
        help="also print Python's version, the libraries' versions and the "
        "keyring backends available with their priority",
    )
    version.add_argument(
        "--json", action="store_true", help="print the verbose output as JSON"
    )
    version.set_defaults(handler=cmd_version)

    add_creds_commands(commands)
    add_export_command(commands)
    _accept_config_after(parser)
    return parser


CONFIG_HELP = (
    "config file (default: $RUNVISOR_CONFIG, ./runvisor.toml, or runvisor.toml "
    "in the user config dir)"
)


def _accept_config_after(parser: argparse.ArgumentParser) -> None:
    """Add `--config` to every subcommand, so that it may follow the
    command's name too (`runvisor serve --config PATH`).

    Its default is SUPPRESS, so a subcommand without the option keeps the
    value given before the command's name.
    """
    for action in parser._actions:  # argparse has no public API for this
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command in action.choices.values():
            if "--config" not in command._option_string_actions:
                command.add_argument(
                    "--config",
                    metavar="PATH",
                    default=argparse.SUPPRESS,
                    help=CONFIG_HELP,
                )
            _accept_config_after(command)


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command and turn its errors into a message on stderr and an
    exit code: 1 for a failed request, 3 when no daemon runs, 130 when
    interrupted (Ctrl-C)."""
    from supervisor.control import Interrupted
    from supervisor.errors import DaemonNotRunning, RunvisorError

    try:
        return handler(args)
    except DaemonNotRunning as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except RunvisorError as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Interrupted):
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return run_handler(handler, args)
    except BrokenPipeError:
        # The reader of a pipe went away (`runvisor events | head`): exit
        # quietly, with stdout pointed at /dev/null so the final flush at
        # interpreter exit does not fail again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
