"""Completion for the shell, built from the CLI parser.

The parser defines the commands, subcommands and options. Each positional
argument that names something carries a `completion` attribute (set by
`cli._completes`) that selects what to offer: project names and run ids
come from the daemon, config keys from the config schema, and credential
nicknames from the credential index.
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from supervisor.cli import CONFIG_KEY, PROJECT, RUN_ID
from supervisor.control import Client
from supervisor.errors import ProtocolError, RunvisorError
from supervisor.protocol import HistoryReply, HistoryRequest, StatusReply, StatusRequest
from supervisor.render import local_time

CACHE_SECONDS = 2.0
"""How long completion reuses project names and run ids it fetched."""

NOT_IN_SHELL = ("serve", "shell", "up")
"""Commands of the CLI that the shell does not run."""

SHELL_COMMANDS = {
    "help": "list the commands, or show the options of one: help COMMAND",
    "watch": "watch on|off: print live events above the prompt",
    "follow": "follow NAME: print a project's output lines above the prompt",
    "unfollow": "unfollow NAME: stop printing a project's output lines",
    "exit": "leave the shell (Ctrl-D too)",
}
"""Commands of the shell alone, with their help."""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Return the subcommands of a parser by name (empty when it has none)."""
    for action in parser._actions:  # argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_table(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    """Yield (name, help) of each command the shell runs from the parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest not in NOT_IN_SHELL:
                    yield choice.dest, choice.help or ""


class ShellCompleter(Completer):
    """Complete commands, options, project names, run ids, config keys and
    credential nicknames, from the CLI parser and the daemon."""

    def __init__(
        self, parser: argparse.ArgumentParser, socket_path: Path, config_path: Path
    ) -> None:
        self.parser = parser
        self.socket_path = socket_path
        self.config_path = config_path
        self._cache: dict[object, tuple[float, list[tuple[str, str]]]] = {}

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        try:
            words = shlex.split(text)
        except ValueError:
            return
        current = ""
        if text and not text[-1].isspace() and words:
            current = words.pop()
        for value, meta in self.candidates(words, current):
            if value.startswith(current):
                yield Completion(value, -len(current), display_meta=meta)

    def candidates(self, words: list[str], current: str) -> list[tuple[str, str]]:
        """Return (value, description) pairs for the word after `words`."""
        commands = subcommands(self.parser)
        if not words:
            names = [
                (name, help_text) for name, help_text in command_table(self.parser)
            ]
            return names + list(SHELL_COMMANDS.items())
        first = words[0]
        if first == "watch" and len(words) == 1:
            return [("on", ""), ("off", "")]
        if first in ("follow", "unfollow") and len(words) == 1:
            return self.projects()
        if first == "help" and len(words) == 1:
            return [(name, "") for name, _ in command_table(self.parser)]

        parser = commands.get(first)
        path = [first]
        rest = words[1:]
        while parser is not None:
            nested = subcommands(parser)
            if not nested:
                break
            if not rest:
                return [(name, "") for name in nested]
            path.append(rest[0])
            parser = nested.get(rest[0])
            rest = rest[1:]
        if parser is None:
            return []
        if current.startswith("-"):
            return [
                (option, action.help or "")
                for action in parser._actions
                for option in action.option_strings
            ]
        option = _option_awaiting_value(parser, rest)
        if option is not None:
            return [(str(choice), "") for choice in (option.choices or [])]
        action = _positional_at(parser, rest)
        if action is None:
            return []
        kind = getattr(action, "completion", None)
        if path[0] == "creds" and action.dest == "name":
            return self.nicknames()
        if kind == PROJECT:
            return self.projects()
        if kind == RUN_ID:
            project = rest[0] if rest else None
            return self.run_ids(project) if project else []
        if kind == CONFIG_KEY:
            return self.config_keys(current)
        return [(str(choice), "") for choice in (action.choices or [])]

    # -- values from the daemon and the config --------------------------------

    def _cached(
        self, key: object, fetch: Callable[[], list[tuple[str, str]]]
    ) -> list[tuple[str, str]]:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        try:
            values = fetch()
        except (RunvisorError, OSError, ProtocolError):
            values = hit[1] if hit else []
        self._cache[key] = (now, values)
        return values

    def projects(self) -> list[tuple[str, str]]:
        def fetch() -> list[tuple[str, str]]:
            with Client.connect(self.socket_path, timeout=1.0) as client:
                reply = client.request(StatusRequest(), timeout=1.0)
            if not isinstance(reply, StatusReply):
                return []
            return [(p.name, f"{p.trigger} {p.state}") for p in reply.projects]

        return self._cached("projects", fetch)

    def run_ids(self, project: str) -> list[tuple[str, str]]:
        def fetch() -> list[tuple[str, str]]:
            with Client.connect(self.socket_path, timeout=1.0) as client:
                reply = client.request(
                    HistoryRequest(name=project, limit=20), timeout=1.0
                )
            if not isinstance(reply, HistoryReply):
                return []
            return [
                (str(run.id), f"{run.status} {local_time(run.started_at)}")
                for run in reply.runs
            ]

        return self._cached(("runs", project), fetch)

    def nicknames(self) -> list[tuple[str, str]]:
        def fetch() -> list[tuple[str, str]]:
            from supervisor.boot import DATABASE_NAME
            from supervisor.config import load_config
            from supervisor.credentials import known_credentials

            config = load_config(self.config_path)
            database = Path(config.runvisor.data_dir) / DATABASE_NAME
            return [
                (name, "credential") for name in sorted(known_credentials(database))
            ]

        return self._cached("nicknames", fetch)

    def config_keys(self, current: str) -> list[tuple[str, str]]:
        """Complete NAME.KEY for `config set`: first the table, then keys."""
        import msgspec

        from supervisor.config import (
            Backoff,
            DaemonSettings,
            HealthConfig,
            ProjectConfig,
        )

        if "." not in current:
            tables = [(f"{name}.", meta) for name, meta in self.projects()]
            return [*tables, ("runvisor.", "daemon settings"), ("credentials.", "")]
        head, _, _ = current.rpartition(".")
        first = head.split(".")[0]
        nested: dict[str, type[msgspec.Struct]] = {
            "backoff": Backoff,
            "health": HealthConfig,
        }
        if first == "runvisor":
            fields = msgspec.structs.fields(DaemonSettings)
        elif first == "credentials":
            return [("credentials.backend", "auto, keyring or file")]
        elif head.split(".")[-1] in nested:
            fields = msgspec.structs.fields(nested[head.split(".")[-1]])
        else:
            fields = msgspec.structs.fields(ProjectConfig)
        return [
            (f"{head}.{field.name}", "")
            for field in fields
            if field.name not in ("name", "env")
        ] + ([(f"{head}.env.", "")] if first not in ("runvisor",) else [])


def _option_awaiting_value(
    parser: argparse.ArgumentParser, words: list[str]
) -> argparse.Action | None:
    """Return the option whose value the next word is, if the last word is
    an option that takes one (such as `--status`)."""
    if not words:
        return None
    for action in parser._actions:
        if words[-1] in action.option_strings and action.nargs != 0:
            return action
    return None


def _positional_at(
    parser: argparse.ArgumentParser, words: list[str]
) -> argparse.Action | None:
    """Return the positional argument that the next word fills."""
    positionals = [action for action in parser._actions if not action.option_strings]
    takes_value = {
        option
        for action in parser._actions
        for option in action.option_strings
        if action.nargs != 0
    }
    count = 0
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in takes_value
        else:
            count += 1
    for index, action in enumerate(positionals):
        if action.nargs in ("*", "+") or count <= index:
            return action
    return None
