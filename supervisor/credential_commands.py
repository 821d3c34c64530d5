"""The `runvisor creds` commands, which manage global credentials.

They work with or without a running daemon: each command opens the
database file (WAL lets it share the file with the daemon) and the
credential backend directly. A daemon reads each secret again at every run,
so a change applies from the next run on.

A secret is read with hidden input on a terminal, or from standard input
when it is not one, and never from an argument, which `ps` would show.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from supervisor.boot import DATABASE_NAME
from supervisor.cli import EXIT_OK, EXIT_USAGE
from supervisor.config import (
    MIN_MASKED_SECRET_LENGTH,
    Config,
    CredentialRef,
    find_config_path,
    load_config,
)
from supervisor.config_checks import NAME_PATTERN
from supervisor.credential_backends import (
    SERVICE_NAME,
    SecretBackend,
    TimedCalls,
    check_secret,
)
from supervisor.credential_file import KEY_FILE_NAME, make_private_dir
from supervisor.credentials import credential_warnings, select_backend
from supervisor.database import Database
from supervisor.errors import CredentialError


@dataclass
class Session:
    """The config, the credential index and the backend of one command."""

    config: Config
    database: Database
    calls: TimedCalls

    @property
    def data_dir(self) -> Path:
        return Path(self.config.runvisor.data_dir)

    def backend(self) -> SecretBackend:
        """Choose the backend. Raises BackendUnavailable when none is usable."""
        setting = self.config.credentials.backend
        environ = dict(os.environ)
        return self.calls.call(
            lambda: select_backend(setting, self.data_dir, environ),
            "choosing the credential backend",
        )

    def mapped_by(self, nickname: str) -> list[str]:
        """Return the projects of the config that map the credential."""
        return [
            project.name
            for project in self.config.projects.values()
            if any(
                isinstance(mapping, CredentialRef) and mapping.credential == nickname
                for mapping in project.env.values()
            )
        ]


@contextmanager
def open_session(args: argparse.Namespace) -> Iterator[Session]:
    config = load_config(find_config_path(args.config))
    data_dir = Path(config.runvisor.data_dir)
    make_private_dir(data_dir)
    database = Database.open(data_dir / DATABASE_NAME)
    try:
        yield Session(config, database, TimedCalls())
    finally:
        database.close()


def run_command(args: argparse.Namespace) -> int:
    """Run the `creds` action that `args.creds_command` names."""
    handlers = {
        "list": list_credentials,
        "add": add_credential,
        "update": update_credential,
        "get": get_credential,
        "delete": delete_credential,
        "backend": show_backend,
    }
    with open_session(args) as session:
        return handlers[args.creds_command](session, args)


def list_credentials(session: Session, args: argparse.Namespace) -> int:
    entries = session.database.credentials()
    for warning in credential_warnings(
        session.config, {entry.nickname for entry in entries}
    ):
        print(f"warning: {warning}", file=sys.stderr)
    mapped = {entry.nickname: session.mapped_by(entry.nickname) for entry in entries}
    if args.json:
        _print_json(
            [
                {
                    "nickname": entry.nickname,
                    "description": entry.description,
                    "created_at": entry.created_at,
                    "updated_at": entry.updated_at,
                    "projects": mapped[entry.nickname],
                }
                for entry in entries
            ]
        )
        return EXIT_OK
    if not entries:
        print("No credentials. Add one with 'runvisor creds add NAME'.")
        return EXIT_OK
    width = max(len("NICKNAME"), *(len(entry.nickname) for entry in entries))
    print(f"{'NICKNAME':<{width}}  {'CREATED':<19}  {'UPDATED':<19}  PROJECTS")
    for entry in entries:
        projects = ", ".join(mapped[entry.nickname]) or "-"
        print(
            f"{entry.nickname:<{width}}  {_time(entry.created_at)}  "
            f"{_time(entry.updated_at)}  {projects}"
        )
        if entry.description:
            print(f"{'':<{width}}  {entry.description}")
    return EXIT_OK


def add_credential(session: Session, args: argparse.Namespace) -> int:
    nickname = _checked_nickname(args.name)
    if session.database.get_credential(nickname) is not None:
        raise CredentialError(
            f"Credential {nickname!r} already exists. Change it with "
            f"'runvisor creds update {nickname}'."
        )
    backend = session.backend()
    value = read_secret(nickname)
    session.calls.call(
        lambda: backend.set(nickname, value), f"storing credential {nickname!r}"
    )
    session.database.add_credential(nickname, args.description or "", datetime.now(UTC))
    print(f"Added credential {nickname!r} to the {backend.info.label}.")
    return EXIT_OK


def update_credential(session: Session, args: argparse.Namespace) -> int:
    nickname = args.name
    if args.keep_secret and args.description is None:
        print(
            "runvisor: nothing to update: --keep-secret needs --description.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if session.database.get_credential(nickname) is None:
        raise CredentialError(
            f"Credential {nickname!r} does not exist. Add it with "
            f"'runvisor creds add {nickname}'."
        )
    if not args.keep_secret:
        backend = session.backend()
        value = read_secret(nickname)
        session.calls.call(
            lambda: backend.set(nickname, value), f"storing credential {nickname!r}"
        )
    session.database.update_credential(nickname, args.description, datetime.now(UTC))
    print(f"Updated credential {nickname!r}.")
    return EXIT_OK


def get_credential(session: Session, args: argparse.Namespace) -> int:
    nickname = args.name
    backend = session.backend()
    value = session.calls.call(
        lambda: backend.get(nickname), f"reading credential {nickname!r}"
    )
    if value is None:
        raise CredentialError(
            f"Credential {nickname!r} is not in the {backend.info.label}. "
            f"Add it with 'runvisor creds add {nickname}'."
        )
    # The shell's stdout (prompt_toolkit's StdoutProxy) is text only.
    binary = getattr(sys.stdout, "buffer", None)
    if binary is not None:
        binary.write(value.encode())
        # On a terminal, end the line so the next prompt starts on its own.
        # In a pipe the value stays exact, with no newline added.
        if sys.stdout.isatty():
            binary.write(b"\n")
        binary.flush()
    else:
        # A newline, so that the prompt follows on a line of its own.
        sys.stdout.write(value + "\n")
        sys.stdout.flush()
    return EXIT_OK


def delete_credential(session: Session, args: argparse.Namespace) -> int:
    nickname = args.name
    projects = session.mapped_by(nickname)
    if projects and not args.force:
        raise CredentialError(
            f"Credential {nickname!r} is mapped by {_join(projects)}, whose runs "
            "would fail without it. Remove those mappings first, or pass --force."
        )
    backend = session.backend()
    in_backend = session.calls.call(
        lambda: backend.delete(nickname), f"deleting credential {nickname!r}"
    )
    in_index = session.database.delete_credential(nickname)
    if not (in_backend or in_index):
        raise CredentialError(
            f"Credential {nickname!r} does not exist. 'runvisor creds list' "
            "lists the stored credentials."
        )
    print(f"Deleted credential {nickname!r}.")
    return EXIT_OK


def show_backend(session: Session, args: argparse.Namespace) -> int:
    info = session.backend().info
    key_note = ""
    if info.kind == "file":
        key_file = session.data_dir / KEY_FILE_NAME
        if info.key_source == f"the key file {key_file}" and not key_file.exists():
            key_note = " (generated when the first secret is stored)"
    if args.json:
        _print_json(
            {
                "kind": info.kind,
                "name": info.name,
                "service": SERVICE_NAME if info.kind == "keyring" else None,
                "location": info.location,
                "key_source": info.key_source,
                "reason": info.reason,
            }
        )
        return EXIT_OK
    if info.kind == "keyring":
        print(f"backend:  OS keychain through keyring ({info.name})")
        print(f"service:  {SERVICE_NAME}")
    else:
        print("backend:  encrypted file (AES-256-GCM)")
        print(f"file:     {info.location}")
        print(f"key:      {info.key_source}{key_note}")
    print(f"chosen:   {info.reason}")
    return EXIT_OK


# Reading a secret


def read_secret(nickname: str) -> str:
    """Read a secret: hidden input on a terminal, else all of standard input
    with one trailing newline removed.

    Raises CredentialError for an empty value, a NUL byte, invalid UTF-8 or
    two terminal entries that differ.
    """
    if sys.stdin.isatty():
        value = getpass.getpass(f"Secret for {nickname} (input is hidden): ")
        again = getpass.getpass("Repeat the secret: ")
        if value != again:
            raise CredentialError(
                "The two entries differ, so nothing was stored. Run the command again."
            )
    else:
        data = sys.stdin.buffer.read()
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CredentialError(
                f"The secret on standard input is not valid UTF-8 (byte "
                f"{error.start}), so nothing was stored."
            ) from None
        value = value.removesuffix("\n")
    if not value:
        raise CredentialError("The secret is empty, so nothing was stored.")
    check_secret(value, "The secret")
    if len(value) < MIN_MASKED_SECRET_LENGTH:
        print(
            f"warning: the secret is shorter than {MIN_MASKED_SECRET_LENGTH} "
            "characters, so it is not masked in run output.",
            file=sys.stderr,
        )
    return value


def _checked_nickname(nickname: str) -> str:
    if not NAME_PATTERN.fullmatch(nickname):
        raise CredentialError(
            f"Invalid nickname {nickname!r}: a nickname is 1 to 64 letters, "
            "digits, '_', '.' or '-', starting with a letter or digit."
        )
    return nickname


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _join(names: list[str]) -> str:
    quoted = [repr(name) for name in names]
    if len(quoted) == 1:
        return f"project {quoted[0]}"
    return f"projects {', '.join(quoted[:-1])} and {quoted[-1]}"


def _print_json(document: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.encode(document).decode() + "\n")
