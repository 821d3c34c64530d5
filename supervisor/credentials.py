"""Credentials for runs: backend choice, lookups, mapping and `.env.local`.

A project maps plain values, secret literals (`{ value = ... }`) and global
credentials (`{ credential = "nickname" }`) to environment variables. Before
each run the daemon resolves them (`resolve_env`), looking up each global
credential in the credential backend (`BackendCredentials`), and writes them
to `.env.local` in the project folder, which `run.sh` can `source`.

The backends themselves are in `credential_backends` (the OS keychain) and
`credential_file` (the encrypted file store). `[credentials] backend`
chooses between them with `select_backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from supervisor.config import Config, CredentialRef, ProjectConfig, SecretValue
from supervisor.config_values import Problems
from supervisor.credential_backends import (
    BACKEND_TIMEOUT,
    NO_KEYRING_HELP,
    BackendInfo,
    KeyringSecrets,
    SecretBackend,
    TimedCalls,
    capitalize,
    check_secret,
    find_keyring,
)
from supervisor.credential_file import (
    FileSecrets,
    find_key_source,
)
from supervisor.errors import BackendUnavailable, CredentialError
from supervisor.toml_lines import KeyLines

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
    """Lookup for a daemon that has no credential backend."""

    async def get(self, nickname: str) -> str:
        raise CredentialError("No credential backend is configured in this daemon.")


def select_backend(
    setting: str, data_dir: Path, environ: Mapping[str, str]
) -> SecretBackend:
    """Return the backend that `[credentials] backend = setting` names.

    "auto" is the OS keychain when keyring finds a usable backend, else the
    encrypted file store. `environ` contains the variables the choice reads:
    PYTHON_KEYRING_BACKEND, RUNVISOR_CREDENTIALS_KEY and
    CREDENTIALS_DIRECTORY. May block on D-Bus: call it through `TimedCalls`.

    Raises BackendUnavailable for "keyring" when no usable keyring backend
    is found.
    """
    if setting == "file":
        source = find_key_source(data_dir, environ)
        return FileSecrets(data_dir, source, 'backend = "file"')
    keychain, finding = find_keyring(environ)
    if keychain is not None:
        return KeyringSecrets(keychain, f'backend = "{setting}" and {finding}')
    if setting == "keyring":
        raise BackendUnavailable(f"{capitalize(finding)}. {NO_KEYRING_HELP}")
    source = find_key_source(data_dir, environ)
    return FileSecrets(data_dir, source, f'backend = "auto" and {finding}')


class BackendCredentials:
    """The daemon's credential lookup, through the configured backend.

    Every backend call runs in a worker thread bounded by `timeout` seconds
    of real time, so a hung keychain fails one lookup instead of freezing
    the daemon. The backend is chosen by `open`. With backend = "keyring"
    and no usable keyring at that time, each lookup tries again and fails
    with the reason until one appears.
    """

    def __init__(
        self,
        setting: str,
        data_dir: Path,
        environ: Mapping[str, str],
        *,
        timeout: float = BACKEND_TIMEOUT,
    ) -> None:
        self.setting = setting
        self.data_dir = data_dir
        self.environ = dict(environ)
        self.calls = TimedCalls(timeout)
        self.backend: SecretBackend | None = None
        self.problem: str | None = None
        """Why no backend is usable, when `backend` is None after `open`."""

    @property
    def info(self) -> BackendInfo | None:
        return None if self.backend is None else self.backend.info

    async def open(self) -> None:
        """Choose the backend. A failure is kept in `problem`, not raised."""
        try:
            self.backend = await self._call(self._select, "choosing the backend")
            self.problem = None
        except CredentialError as error:
            self.problem = str(error)
        except Exception as error:
            logger.error("credentials: choosing the backend failed", exc_info=error)
            self.problem = (
                f"Choosing the credential backend failed with "
                f"{type(error).__name__}; the daemon log has the details."
            )

    async def get(self, nickname: str) -> str:
        backend = self.backend
        if backend is None:
            await self.open()
            backend = self.backend
            if backend is None:
                raise BackendUnavailable(self.problem or "No credential backend.")
            logger.info("credentials: now using %s", backend.info.summary())
        try:
            value = await self._call(
                partial(backend.get, nickname), f"reading credential {nickname!r}"
            )
        except (CredentialError, OSError):
            raise
        except Exception as error:
            # A bug in a backend must fail the run, not the daemon. Only the
            # type is shown, so no text from inside the store can leak.
            logger.error("credentials: lookup failed", exc_info=error)
            raise CredentialError(
                f"The {backend.info.label} failed with {type(error).__name__}; "
                "the daemon log has the details."
            ) from None
        if value is None:
            raise CredentialError(
                f"The credential is not in the {backend.info.label}. Add it "
                f"with 'runvisor creds add {nickname}'."
            )
        return value

    def _select(self) -> SecretBackend:
        return select_backend(self.setting, self.data_dir, self.environ)

    async def _call(self, function: Callable[[], T], description: str) -> T:
        return await trio.to_thread.run_sync(
            partial(self.calls.call, function, description), abandon_on_cancel=True
        )


async def resolve_env(project: ProjectConfig, lookup: CredentialLookup) -> ResolvedEnv:
    """Resolve every mapping of the project.

    Raises CredentialError naming the variable and the nickname when a
    credential cannot be resolved; the message never contains a value.
    """
    variables: dict[str, str] = {}
    hidden: list[str] = []
    for name, mapping in project.env.items():
        if isinstance(mapping, CredentialRef):
            source = f"credential {mapping.credential!r}"
            try:
                value = await lookup.get(mapping.credential)
                check_secret(value, f"The value of {source}")
            except CredentialError as error:
                raise CredentialError(
                    f"Cannot resolve {name} from {source}. {error}"
                ) from None
            hidden.append(value)
        elif isinstance(mapping, SecretValue):
            value = mapping.value
            hidden.append(value)
        else:
            value = mapping
        variables[name] = value
    return ResolvedEnv(variables=variables, secrets=tuple(hidden))


def credential_warnings(config: Config, known: Collection[str]) -> list[str]:
    """Return a warning for each mapping to a nickname not in `known`.

    Each warning is `FILE:LINE: KEY: message`, like the config's own.
    """
    try:
        lines = KeyLines(Path(config.source).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        lines = KeyLines("")
    problems = Problems(config.source, lines)
    for project in config.projects.values():
        for name, mapping in project.env.items():
            if isinstance(mapping, CredentialRef) and mapping.credential not in known:
                nickname = mapping.credential
                problems.add(
                    ("projects", project.name, "env", name),
                    f"credential {nickname!r} is not stored, so runs of "
                    f"{project.name!r} fail until it is added with "
                    f"'runvisor creds add {nickname}'.",
                )
    return problems.messages()


def known_credentials(database_path: Path) -> set[str]:
    """Return the nicknames in the credential index of a database file.

    A database that does not exist yet has none, and is not created.
    """
    from supervisor.database import Database

    if not database_path.exists():
        return set()
    database = Database.open(database_path)
    try:
        return {entry.nickname for entry in database.credentials()}
    finally:
        database.close()
