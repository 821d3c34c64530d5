"""The interactive shell: `runvisor shell` and `runvisor up`.

`runvisor shell` attaches to the running daemon. `runvisor up` runs the
daemon and the shell in one process, and leaving the shell stops the daemon,
after a confirmation when the shell runs on a terminal. The shell runs the
CLI's commands from the CLI's own parser, so both accept the same commands
and options, and the parser also drives the completion.

How it fits together, with trio as the only event loop:

- `PromptSession.prompt` runs in a worker thread, inside
  `patch_stdout(raw=True)`. Anything printed while the prompt is shown
  (live events, followed log lines, the daemon's own warnings in `up`) goes
  above the prompt and leaves the half-typed line intact. Logging is
  configured after entering `patch_stdout`, so it writes through it too.
- A command also runs in a worker thread, with the blocking client. Ctrl-C
  while it runs is a real SIGINT (the terminal is not in raw mode then),
  which a trio signal receiver turns into an interrupt of that command's
  connections. Managed projects never see it: each run leads its own
  session.
- A background task keeps one `events` subscription open, prints events
  while `watch` is on and log lines of `follow`ed projects, and reconnects
  when the daemon goes away.

When stdin is not a terminal, no prompt_toolkit is used: commands are read
line by line, output has no escape codes, and end of input exits with 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

from supervisor.cli import (
    EXIT_FAILED,
    EXIT_OK,
    build_parser,
    run_handler,
)
from supervisor.control import Client, locate_config, locate_daemon
from supervisor.control_commands import Interrupter
from supervisor.errors import ControlError, RunvisorError
from supervisor.model import LogEvent
from supervisor.protocol import (
    ErrorReply,
    EventReply,
    EventsRequest,
    FrameReader,
    SkippedReply,
    encode_frame,
)
from supervisor.render import (
    Style,
    color_enabled,
    format_event,
    is_terminal,
    local_time,
)
from supervisor.repl_completion import (
    NOT_IN_SHELL,
    SHELL_COMMANDS,
    ShellCompleter,
    command_table,
    subcommands,
)

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

logger = logging.getLogger(__name__)

PROMPT = "runvisor> "
HISTORY_FILE = "shell_history"
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
"""Seconds between attempts to reach a lost daemon, the last one repeated."""


def cmd_shell(args: argparse.Namespace) -> int:
    config_path = locate_config(args.config)
    shell = Shell(config_path, interactive=_is_interactive())
    return trio.run(shell.run)


def cmd_up(args: argparse.Namespace) -> int:
    from supervisor.daemon import Daemon
    from supervisor.errors import ConfigError

    config_path = locate_config(args.config)
    try:
        daemon = Daemon(config_path)
    except ConfigError as error:
        print(f"runvisor: invalid config, not starting:\n{error}", file=sys.stderr)
        return EXIT_FAILED
    shell = Shell(
        config_path,
        interactive=_is_interactive(),
        daemon=daemon,
        log_level=args.log_level or daemon.config.runvisor.log_level,
    )
    return trio.run(shell.run)


def _is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


class _PlainOutput:
    """A text stream whose `isatty` returns False, so that commands of the
    non-interactive shell print no escape codes and never cut tables."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Shell:
    """One session of the shell, attached to a daemon over its socket.

    With `daemon`, the shell runs that daemon in the same trio run (`up`),
    and stops it when the shell ends.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        interactive: bool,
        daemon: Daemon | None = None,
        log_level: str = "info",
    ) -> None:
        self.config_path = config_path
        paths = locate_daemon(config_path)
        self.socket_path = paths.socket
        self.data_dir = paths.data_dir
        self.interactive = interactive
        self.daemon = daemon
        self.log_level = log_level
        self.parser = build_parser()
        self.watch = interactive
        self.followed: set[str] = set()
        self.connected = False
        self._current: Interrupter | None = None
        self._resubscribe: trio.CancelScope | None = None
        self._session: PromptSession[str] | None = None
        self._loop_scope = trio.CancelScope()
        self._loop_cancel_code = EXIT_OK
        self._daemon_done = trio.Event()
        self._leaving = False
        self._watch_scope = trio.CancelScope()

    # -- entry --------------------------------------------------------------

    async def run(self) -> int:
        """Run the shell until `exit`, Ctrl-D or the end of input; return
        the exit code."""
        if self.interactive:
            with patch_stdout(raw=True):
                self._configure_logging()
                return await self._serve()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = _PlainOutput(stdout)
        sys.stderr = _PlainOutput(stderr)
        try:
            self._configure_logging()
            return await self._serve()
        finally:
            sys.stdout, sys.stderr = stdout, stderr

    async def _serve(self) -> int:
        async with trio.open_nursery() as nursery:
            if self.daemon is not None:
                try:
                    await nursery.start(self._run_daemon)
                except RunvisorError as error:
                    print(f"runvisor: {error}", file=sys.stderr)
                    return EXIT_FAILED
            elif not await self._daemon_answers():
                print(
                    f"runvisor: No runvisor daemon is listening on "
                    f"{self.socket_path}. Start one with 'runvisor serve', or "
                    "use 'runvisor up' for the daemon with a shell.",
                    file=sys.stderr,
                )
                return 3

            # Opened after the daemon's own receiver, so SIGINT comes here.
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                nursery.start_soon(self._watch_sigint, signals)
                nursery.start_soon(self._watch_events_until_leaving)
                if self.interactive:
                    self._session = self._new_session()
                    print(
                        f"runvisor shell on {self.socket_path}. Type 'help' for "
                        "the commands, Tab to complete, Ctrl-D to leave."
                    )
                code = EXIT_OK
                with self._loop_scope:
                    code = await self._command_loop()
                if self._loop_scope.cancelled_caught:
                    code = self._loop_cancel_code

            self._leaving = True
            self._watch_scope.cancel()
            if self.daemon is not None and not self._daemon_done.is_set():
                if not self.daemon.shutting_down:
                    print("Stopping the daemon and every project.")
                    self.daemon.request_shutdown()
                await self._daemon_done.wait()
            nursery.cancel_scope.cancel()
        return code

    async def _run_daemon(self, task_status: trio.TaskStatus[Daemon]) -> None:
        assert self.daemon is not None
        try:
            await self.daemon.serve(task_status=task_status)
        finally:
            self._daemon_done.set()
        if not self._leaving:
            # The daemon stopped by itself (the shutdown command, SIGTERM),
            # so the shell ends too.
            print("The daemon has stopped.")
            self._loop_cancel_code = EXIT_OK
            self._loop_scope.cancel()

    def _configure_logging(self) -> None:
        root = logging.getLogger()
        root.setLevel(logging.DEBUG)
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setLevel(logging.WARNING)
        terminal.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root.addHandler(terminal)
        if self.daemon is not None:
            # The daemon's full log goes to a file, so the terminal shows
            # only what needs attention.
            path = self.daemon.data_dir / "runvisor.log"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            to_file = logging.FileHandler(path)
            to_file.setLevel(getattr(logging, self.log_level.upper(), logging.INFO))
            to_file.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            root.addHandler(to_file)

    async def _daemon_answers(self) -> bool:
        def probe() -> bool:
            try:
                Client.connect(self.socket_path).close()
            except ControlError:
                return False
            return True

        return await trio.to_thread.run_sync(probe)

    # -- reading and running commands ---------------------------------------

    async def _command_loop(self) -> int:
        while True:
            line = await self._read_line()
            if line is None:
                if await self._confirm_exit():
                    return EXIT_OK
                continue
            words = _split(line)
            if words is None:
                continue
            if words and words[0] in ("exit", "quit"):
                if await self._confirm_exit():
                    return EXIT_OK
                continue
            await self.run_command(words)

    async def _read_line(self) -> str | None:
        """Return the next command line, "" after Ctrl-C, None at the end."""
        if not self.interactive:
            line: str = await trio.to_thread.run_sync(
                sys.stdin.readline, abandon_on_cancel=True
            )
            return line if line else None
        try:
            return await self._prompt(PROMPT)
        except KeyboardInterrupt:
            return ""  # Ctrl-C clears the line
        except EOFError:
            return None

    async def _prompt(self, message: str) -> str:
        session = self._session
        assert session is not None
        finished = threading.Event()

        def prompt() -> str:
            try:
                return session.prompt(
                    message, handle_sigint=False, set_exception_handler=False
                )
            finally:
                finished.set()

        try:
            return await trio.to_thread.run_sync(prompt, abandon_on_cancel=True)
        finally:
            if not finished.is_set():
                # Cancelled while the prompt is shown: end it from here, or
                # the terminal stays in raw mode.
                app = session.app
                loop = getattr(app, "loop", None)
                if app.is_running and loop is not None:
                    loop.call_soon_threadsafe(partial(app.exit, exception=EOFError()))
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(finished.wait, 2.0)

    async def _confirm_exit(self) -> bool:
        if self.daemon is None or not self.interactive:
            return True
        try:
            answer = await self._prompt(
                "Leaving stops the daemon and every project. Leave? [y/N] "
            )
        except (KeyboardInterrupt, EOFError):
            return False
        return answer.strip().lower() in ("y", "yes")

    async def run_command(self, words: list[str]) -> int:
        """Run one command line, split into words; return its exit code.

        An unexpected exception of the command ends only that command: the
        shell prints one error line, logs the traceback at debug level and
        reads the next line.
        """
        try:
            return await self._run_command(words)
        except Exception as error:
            # The words are not logged: a rejected line may carry a secret.
            logger.debug("the shell command %r failed", words[0], exc_info=True)
            print(
                f"runvisor: {words[0]!r} failed with an internal error: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )
            return EXIT_FAILED

    async def _run_command(self, words: list[str]) -> int:
        if not words:
            return EXIT_OK
        name = words[0]
        if name in SHELL_COMMANDS:
            return self._shell_command(name, words[1:])
        if name in NOT_IN_SHELL:
            print(f"'{name}' is not available inside the shell.", file=sys.stderr)
            return EXIT_FAILED
        if name not in subcommands(self.parser):
            print(
                f"Unknown command {name!r}. Type 'help' to list the commands.",
                file=sys.stderr,
            )
            return 2
        args = self._parse(words)
        if args is None:
            return 2
        interrupter = Interrupter()
        args.interrupter = interrupter
        self._current = interrupter
        try:
            code: int = await trio.to_thread.run_sync(run_handler, args.handler, args)
        finally:
            self._current = None
        if code == 130:
            print("Interrupted.")
        return code

    def _parse(self, words: list[str]) -> argparse.Namespace | None:
        namespace = argparse.Namespace(config=str(self.config_path))
        try:
            args = self.parser.parse_args(words, namespace=namespace)
        except SystemExit:
            return None  # argparse printed the usage error or the help
        if getattr(args, "handler", None) is None:
            self.parser.parse_args([*words, "--help"], namespace=namespace)
            return None
        return args

    def _shell_command(self, name: str, rest: list[str]) -> int:
        if name == "help":
            if rest:
                self._parse([*rest, "--help"])
            else:
                self._print_help()
            return EXIT_OK
        if name == "watch":
            if rest not in (["on"], ["off"]):
                print("Write 'watch on' or 'watch off'.", file=sys.stderr)
                return 2
            self.watch = rest == ["on"]
            print(f"Live events {'on' if self.watch else 'off'}.")
            return EXIT_OK
        if name in ("follow", "unfollow"):
            if len(rest) != 1:
                print(f"Write '{name} NAME'.", file=sys.stderr)
                return 2
            if name == "follow":
                self.followed.add(rest[0])
                print(f"Following the output of {rest[0]!r} ('unfollow' stops).")
            else:
                self.followed.discard(rest[0])
                print(f"Stopped following the output of {rest[0]!r}.")
            if self._resubscribe is not None:
                self._resubscribe.cancel()
            return EXIT_OK
        raise AssertionError(name)  # pragma: no cover

    def _print_help(self) -> None:
        rows = [(name, help_text) for name, help_text in command_table(self.parser)]
        rows += list(SHELL_COMMANDS.items())
        width = max(len(name) for name, _ in rows)
        print("Commands (help COMMAND shows its options):")
        for name, help_text in rows:
            print(f"  {name:<{width}}  {help_text}")

    # -- signals ------------------------------------------------------------

    async def _watch_sigint(self, signals: AsyncIterator[int]) -> None:
        """Interrupt the running command on SIGINT. Without a command, a
        non-interactive shell ends with 130; on a terminal the prompt itself
        handles Ctrl-C as a key."""
        async for _ in signals:
            current = self._current
            if current is not None:
                current.interrupt()
            elif not self.interactive:
                self._loop_cancel_code = 130
                self._loop_scope.cancel()

    # -- live events --------------------------------------------------------

    async def _watch_events_until_leaving(self) -> None:
        with self._watch_scope:
            await self._watch_events()

    async def _watch_events(self) -> None:
        """Keep an event subscription open, print what it brings, and
        reconnect when the daemon goes away."""
        failures = 0
        lost_reported = False

        def on_subscribed() -> None:
            nonlocal failures, lost_reported
            failures = 0
            if lost_reported:
                print("Reconnected to the daemon.")
                lost_reported = False

        while True:
            with trio.CancelScope() as scope:
                # `follow` and `unfollow` cancel this scope to subscribe anew.
                self._resubscribe = scope
                try:
                    await self._receive_events(on_subscribed)
                except (OSError, ControlError, trio.BrokenResourceError) as error:
                    self.connected = False
                    if self.daemon is not None and self.daemon.shutting_down:
                        return  # `up` is stopping its own daemon
                    if not lost_reported:
                        print(
                            f"Lost the connection to the daemon ({error}); "
                            "reconnecting.",
                            file=sys.stderr,
                        )
                        lost_reported = True
                    delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                    failures += 1
                    await trio.sleep(delay)
            self._resubscribe = None

    async def _receive_events(self, on_subscribed: Callable[[], None]) -> None:
        """Subscribe to events and print them until the connection ends.

        Raises:
            OSError, ControlError: the connection cannot be made or broke.
        """
        stream = await trio.open_unix_socket(os.fspath(self.socket_path))
        async with stream:
            _check_peer(stream.socket, self.socket_path)
            request = EventsRequest(id=1, log_projects=sorted(self.followed))
            await stream.send_all(encode_frame(request))
            reader = FrameReader()
            while True:
                message = reader.next_message()
                if message is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ControlError("the daemon closed the connection")
                    reader.feed(data)
                    continue
                if isinstance(message, EventReply | SkippedReply):
                    self._print_event(message)
                elif isinstance(message, ErrorReply):
                    raise ControlError(message.message)
                else:  # the acknowledgement
                    self.connected = True
                    on_subscribed()

    def _print_event(self, message: Any) -> None:
        style = Style(color_enabled(sys.stdout), escape=is_terminal(sys.stdout))
        if isinstance(message, SkippedReply):
            print(f"({message.count} events skipped: the shell read too slowly)")
            return
        event = message.event
        if isinstance(event, LogEvent):
            if event.project in self.followed:
                stamp = style.paint(local_time(event.at, date=False), "dim")
                print(f"{stamp} {event.project} | {style.text(event.text)}")
            return
        if self.watch:
            print(format_event(event, style))

    def _new_session(self) -> PromptSession[str]:
        return PromptSession(
            history=_open_history(self.data_dir),
            completer=ShellCompleter(self.parser, self.socket_path, self.config_path),
            complete_while_typing=False,
        )


def _check_peer(sock: Any, path: Path) -> None:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(data[4:8], sys.byteorder)
    if uid != os.getuid():
        raise ControlError(f"The control socket {path} is served by user id {uid}.")


def _split(line: str) -> list[str] | None:
    try:
        return shlex.split(line, comments=True)
    except ValueError as error:
        print(f"Cannot read the line: {error}.", file=sys.stderr)
        return None


# `NAME.env.VAR.value` as a key, or `{ value = ... }` as the value of an
# env key: the two ways a `config set` line can carry a secret literal.
_SECRET_KEY = re.compile(r"\.env\.\S*\bvalue\b")
_ENV_KEY = re.compile(r"\.env\.")
_SECRET_TABLE = re.compile(r"\bvalue\s*=")


def carries_secret(line: str) -> bool:
    """Tell whether a shell line assigns a secret literal of an env mapping.

    `config set` rejects such a line, and the shell keeps it out of its
    history, whether it was valid or not.
    """
    if _SECRET_KEY.search(line):
        return True
    return bool(_ENV_KEY.search(line) and _SECRET_TABLE.search(line))


class _FileHistoryWithoutSecrets(FileHistory):
    def append_string(self, string: str) -> None:
        if not carries_secret(string):
            super().append_string(string)


class _MemoryHistoryWithoutSecrets(InMemoryHistory):
    def append_string(self, string: str) -> None:
        if not carries_secret(string):
            super().append_string(string)


def _open_history(data_dir: Path) -> FileHistory | InMemoryHistory:
    """History of past sessions, in the data dir, readable by the user only.
    Lines that carry a secret are left out."""
    path = data_dir / HISTORY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as error:
        logger.warning("cannot keep the shell history in %s: %s", path, error)
        return _MemoryHistoryWithoutSecrets()
    return _FileHistoryWithoutSecrets(os.fspath(path))
