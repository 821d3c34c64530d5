"""Resolution of a project's environment mappings, and `.env.local` writing.

A project maps plain values, secret literals (`{ value = ... }`) and global
credentials (`{ credential = "nickname" }`) to environment variables. Before
each run the resolved variables are written to `.env.local` in the project
folder, which `run.sh` can `source`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from supervisor.config import CredentialRef, ProjectConfig, SecretValue
from supervisor.errors import CredentialError

ENV_FILE_NAME = ".env.local"


@dataclass(frozen=True)
class ResolvedEnv:
    """A project's variables for one run, and the values to mask in output."""

    variables: dict[str, str]
    secrets: tuple[str, ...]


class CredentialLookup(Protocol):
    async def get(self, nickname: str) -> str:
        """Return the secret of a global credential, or raise CredentialError."""
        ...


class NoCredentialStore:
    """Lookup used until a credential backend is configured."""

    async def get(self, nickname: str) -> str:
        raise CredentialError("no credential store is available yet")


async def resolve_env(project: ProjectConfig, lookup: CredentialLookup) -> ResolvedEnv:
    """Resolve every mapping of the project.

    Raises CredentialError naming the variable and the nickname when a
    credential cannot be resolved; the message never contains a value.
    """
    variables: dict[str, str] = {}
    hidden: list[str] = []
    for name, mapping in project.env.items():
        if isinstance(mapping, CredentialRef):
            try:
                value = await lookup.get(mapping.credential)
            except CredentialError as error:
                raise CredentialError(
                    f"Cannot resolve {name} from credential "
                    f"{mapping.credential!r}: {error}"
                ) from None
            hidden.append(value)
        elif isinstance(mapping, SecretValue):
            value = mapping.value
            hidden.append(value)
        else:
            value = mapping
        variables[name] = value
    return ResolvedEnv(variables=variables, secrets=tuple(hidden))


def quote_for_bash(value: str) -> str:
    """Quote a value so that bash reads it back byte for byte.

    Inside single quotes bash takes every byte literally, newlines included;
    a single quote itself is written as '\\'' (close, escaped quote, reopen).
    """
    if "\0" in value:
        raise CredentialError("A value contains a NUL byte, which bash cannot hold.")
    return "'" + value.replace("'", "'\\''") + "'"


def format_env_file(variables: Mapping[str, str]) -> str:
    lines = [
        f"export {name}={quote_for_bash(value)}\n" for name, value in variables.items()
    ]
    return "".join(lines)


def write_env_file(folder: Path, variables: Mapping[str, str]) -> Path:
    """Write `.env.local` atomically, mode 0600 from its first byte.

    The content goes to a new temporary file in the same folder (created with
    O_EXCL and O_NOFOLLOW, so no planted file or symlink is written through)
    and is then renamed over `.env.local`. The rename replaces a symlink at
    that name instead of following it.
    """
    target = folder / ENV_FILE_NAME
    content = format_env_file(variables).encode()
    temporary = folder / f".env.local.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        # The creation mode is filtered by the umask; make it exact.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


def remove_env_file(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / ENV_FILE_NAME)
