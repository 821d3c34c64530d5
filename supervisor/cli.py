"""Command-line entry point: argument parsing, logging setup, commands.

`runvisor --version` and `--help` import nothing heavy: every command
imports what it needs when it runs.

Exit codes: 0 success, 1 the request failed, 2 usage error, 3 no daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisor import __version__

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
    import trio

    from supervisor.config import find_config_path
    from supervisor.daemon import Daemon
    from supervisor.errors import ConfigError, StoreError

    path = find_config_path(args.config)
    try:
        daemon = Daemon(path)
    except ConfigError as error:
        print(f"runvisor: invalid config, not starting:\n{error}", file=sys.stderr)
        return EXIT_FAILED
    setup_logging(args.log_level or daemon.config.runvisor.log_level)
    try:
        trio.run(daemon.serve)
    except StoreError as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from supervisor.config import check_config, find_config_path

    path = Path(args.path) if args.path else find_config_path(args.config)
    config, errors, warnings = check_config(path)
    if config is not None:
        warnings += _credential_warnings(config)
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
    from supervisor.credentials import credential_warnings, known_credentials
    from supervisor.daemon import DATABASE_NAME
    from supervisor.errors import StoreError

    database = Path(config.runvisor.data_dir) / DATABASE_NAME
    try:
        known = known_credentials(database)
    except StoreError as error:
        return [f"cannot check credential nicknames: {error}"]
    return credential_warnings(config, known)


def cmd_history(args: argparse.Namespace) -> int:
    from supervisor.daemon import DATABASE_NAME
    from supervisor.model import RunStatus
    from supervisor.store import Database

    config = _load_config(args)
    if args.name and args.name not in config.projects:
        print(f"runvisor: project {args.name!r} is not in the config.", file=sys.stderr)
        return EXIT_FAILED
    database = Database.open(Path(config.runvisor.data_dir) / DATABASE_NAME)
    try:
        runs = database.history(
            args.name,
            limit=args.limit,
            status=RunStatus(args.status) if args.status else None,
        )
    finally:
        database.close()
    if args.json:
        print_json(runs)
        return EXIT_OK
    header = ("RUN", "PROJECT", "TRIGGER", "STATUS", "STARTED")
    print(
        f"{header[0]:>6}  {header[1]:<16} {header[2]:<9} {header[3]:<10} "
        f"{header[4]:<20} REASON"
    )
    for run in runs:
        started = run.started_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{run.id:>6}  {run.project:<16} {run.trigger:<9} {run.status:<10} "
            f"{started:<20} {run.reason}"
        )
    return EXIT_OK


def cmd_status_offline(args: argparse.Namespace) -> int:
    """Status from the store alone, for when no daemon answers."""
    from supervisor.daemon import DATABASE_NAME
    from supervisor.store import Database

    config = _load_config(args)
    database = Database.open(Path(config.runvisor.data_dir) / DATABASE_NAME)
    try:
        last = database.last_runs()
    finally:
        database.close()
    names = [args.name] if args.name else list(config.projects)
    rows = []
    for name in names:
        if name not in config.projects:
            print(f"runvisor: project {name!r} is not in the config.", file=sys.stderr)
            return EXIT_FAILED
        rows.append(
            {
                "name": name,
                "trigger": str(config.projects[name].trigger),
                "last_run": last.get(name),
            }
        )
    if args.json:
        print_json(rows)
        return EXIT_OK
    for row in rows:
        run = row["last_run"]
        summary = f"run {run.id} {run.status} {run.reason}" if run else "no runs yet"
        print(f"{row['name']:<16} {row['trigger']:<15} {summary}")
    return EXIT_OK


def cmd_next(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from supervisor.model import TriggerMode
    from supervisor.scheduler import CronSchedule

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
    after = datetime.fromisoformat(args.after) if args.after else datetime.now(UTC)
    if after.tzinfo is None:
        after = after.replace(tzinfo=schedule.tzinfo)
    times = schedule.next_times(after, args.count)
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
    print(f"{project.cron}  ({schedule.describe()}, {schedule.timezone_name})")
    for when in times:
        print(f"{when.isoformat()}  {when.astimezone(UTC).isoformat()}")
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
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $RUNVISOR_CONFIG, ./runvisor.toml, "
        "or runvisor.toml in the user config dir)",
    )
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
    check.set_defaults(handler=cmd_config_check)

    status = commands.add_parser("status", help="state of all projects or one")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(handler=cmd_status_offline)

    history = commands.add_parser("history", help="run history")
    history.add_argument("name", nargs="?")
    history.add_argument(
        "--limit", type=int, default=20, help="rows to show (default 20)"
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
    history.add_argument("--json", action="store_true", help="print one JSON document")
    history.set_defaults(handler=cmd_history)

    next_ = commands.add_parser("next", help="next fire times of a scheduled project")
    next_.add_argument("name")
    next_.add_argument("count", nargs="?", type=int, default=5)
    next_.add_argument(
        "--after", metavar="TIME", help="ISO 8601 instant to list from (default: now)"
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from supervisor.errors import RunvisorError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except RunvisorError as error:
        print(f"runvisor: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
