"""Credential backends: the stores of global credential secrets, and the
timeouts around their calls.

A backend stores each secret under the service name `runvisor` and the
credential's nickname. There are two:

- `KeyringSecrets` (here): the OS keychain through `keyring`, such as the
  Secret Service on Linux or the Keychain on macOS. keyring's default chain
  is never used, because it can end at a backend that waits for an
  interactive password: `find_keyring` picks one backend explicitly.
- `FileSecrets` (in `credential_file`): one encrypted file in the data dir.

Every backend method may block, since a keychain can wait on D-Bus or on an
unlock prompt. Callers go through `TimedCalls`, which runs each call in a
thread and gives up after a timeout. Errors are `CredentialError`, and no
message contains a secret value.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from supervisor.errors import CredentialError

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

T = TypeVar("T")

SERVICE_NAME = "runvisor"
KEYRING_VARIABLE = "PYTHON_KEYRING_BACKEND"

BACKEND_TIMEOUT = 10.0
"""Seconds a backend call may take before it counts as hung."""

MAX_HUNG_CALLS = 4
"""Calls that may be left hung in their threads before new calls fail at once."""

NO_KEYRING_HELP = (
    "Start a Secret Service for this user's D-Bus session (such as "
    'gnome-keyring-daemon), or set backend = "file" in [credentials] to use '
    "the encrypted file store."
)

# Modules of keyring's placeholder backends: `fail` raises on every call,
# `null` stores nothing and `chainer` is the default chain, which may prompt.
_PLACEHOLDER_MODULES = frozenset(
    {"keyring.backends.fail", "keyring.backends.null", "keyring.backends.chainer"}
)


@dataclass(frozen=True)
class BackendInfo:
    """Description of the chosen backend and the reason for the choice."""

    kind: Literal["keyring", "file"]
    name: str
    """The keyring backend class, or "encrypted file"."""
    reason: str
    location: str | None = None
    """The store file of the file backend."""
    key_source: str | None = None
    """The origin of the file backend's key."""

    @property
    def label(self) -> str:
        if self.kind == "keyring":
            return f"keychain {self.name}"
        return f"encrypted file store {self.location}"

    def summary(self) -> str:
        if self.kind == "keyring":
            return f"OS keychain through keyring ({self.name})"
        return f"encrypted file {self.location}, key from {self.key_source}"


class SecretBackend(Protocol):
    info: BackendInfo

    def get(self, nickname: str) -> str | None:
        """Return the secret, or None when the backend has none by that name."""
        ...

    def set(self, nickname: str, value: str) -> None: ...

    def delete(self, nickname: str) -> bool:
        """Delete the secret. Returns False when there was none."""
        ...


def check_secret(value: str, what: str) -> None:
    """Raise CredentialError when `value` cannot be stored or exported.

    `what` names the value in the message, which never contains the value.
    """
    if "\0" in value:
        raise CredentialError(
            f"{what} contains a NUL byte, which an environment variable cannot "
            "hold. Store a value without NUL bytes."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CredentialError(
            f"{what} contains a lone surrogate, which is not valid UTF-8. "
            "Store it again as valid text."
        ) from None


# Calls with a timeout


class TimedCalls:
    """Run blocking backend calls in threads, each bounded by a timeout.

    A call that times out keeps its thread, which is a daemon thread, until
    the backend returns. Once MAX_HUNG_CALLS such threads are waiting, new
    calls fail at once instead of adding more.
    """

    def __init__(self, timeout: float = BACKEND_TIMEOUT) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._hung = 0

    @property
    def hung(self) -> int:
        with self._lock:
            return self._hung

    def call(self, function: Callable[[], T], description: str) -> T:
        """Return `function()`, or raise CredentialError after the timeout.

        `description` names the operation for the timeout message, such as
        "reading credential 'db'".
        """
        if self.hung >= MAX_HUNG_CALLS:
            raise CredentialError(
                f"{self.hung} earlier calls to the credential backend have not "
                f"returned, so {description} was not tried. Check that the "
                "keychain is running and unlocked, then restart runvisor."
            )
        outcome: dict[str, Any] = {}
        done = threading.Event()
        abandoned = False

        def work() -> None:
            nonlocal abandoned
            try:
                outcome["value"] = function()
            except BaseException as error:
                outcome["error"] = error
            finally:
                with self._lock:
                    done.set()
                    if abandoned:
                        self._hung -= 1

        thread = threading.Thread(target=work, name="runvisor-credentials")
        thread.daemon = True
        thread.start()
        done.wait(self.timeout)
        with self._lock:
            if not done.is_set():
                abandoned = True
                self._hung += 1
        if abandoned:
            raise CredentialError(
                f"The credential backend timed out after {self.timeout:g} seconds "
                f"while {description}. A keychain that waits for an unlock "
                'prompt does this, so unlock it, or set backend = "file".'
            )
        if "error" in outcome:
            raise outcome["error"]
        value: T = outcome["value"]
        return value


# Finding a keyring backend


def find_keyring(environ: Mapping[str, str]) -> tuple[KeyringBackend | None, str]:
    """Return the keyring backend to use and how it was found, or None and
    why none is usable.

    A backend named by PYTHON_KEYRING_BACKEND is used whatever its priority.
    Otherwise the backend with the highest priority of at least 1 (keyring's
    "recommended" level) is used. The placeholder backends (fail, null,
    chainer) are never used.
    """
    import keyring.backend
    import keyring.core

    chosen = environ.get(KEYRING_VARIABLE, "").strip()
    if chosen:
        try:
            named = keyring.core.load_keyring(chosen)
        except Exception as error:
            return None, (
                f"{KEYRING_VARIABLE} names {chosen!r}, which cannot be loaded "
                f"({type(error).__name__}: {error})"
            )
        if _is_placeholder(named):
            return None, f"{KEYRING_VARIABLE} names {chosen!r}, which stores nothing"
        return named, f"{KEYRING_VARIABLE} names it"

    # get_all_keyring registers the plugin backends but caches its result
    # forever. Viability is checked again here, because a Secret Service may
    # have started since the last call.
    keyring.backend.get_all_keyring()
    usable: list[KeyringBackend] = []
    for backend_class in keyring.backend.KeyringBackend.get_viable_backends():
        with contextlib.suppress(Exception):
            backend = backend_class()
            if backend.priority >= 1 and not _is_placeholder(backend):
                usable.append(backend)
    if not usable:
        return None, "no usable keyring backend was found"
    best = max(usable, key=keyring.backend.by_priority)
    return best, f"keyring recommends {_class_name(best)}"


def _is_placeholder(backend: object) -> bool:
    return type(backend).__module__ in _PLACEHOLDER_MODULES


def _class_name(backend: object) -> str:
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


# The OS keychain


class KeyringSecrets:
    """Secrets in one keyring backend, under the service name `runvisor`."""

    def __init__(self, backend: KeyringBackend, reason: str) -> None:
        self._backend = backend
        self.info = BackendInfo(
            kind="keyring", name=_class_name(backend), reason=reason
        )

    def get(self, nickname: str) -> str | None:
        try:
            value = self._backend.get_password(SERVICE_NAME, nickname)
        except Exception as error:
            raise self._error("read", nickname, error) from None
        return None if value is None else str(value)

    def set(self, nickname: str, value: str) -> None:
        check_secret(value, f"The secret of {nickname!r}")
        try:
            self._backend.set_password(SERVICE_NAME, nickname, value)
        except Exception as error:
            raise self._error("store", nickname, error, value) from None

    def delete(self, nickname: str) -> bool:
        import keyring.errors

        try:
            self._backend.delete_password(SERVICE_NAME, nickname)
        except keyring.errors.PasswordDeleteError:
            return False
        except Exception as error:
            raise self._error("delete", nickname, error) from None
        return True

    def _error(
        self, action: str, nickname: str, error: Exception, value: str | None = None
    ) -> CredentialError:
        detail = f"{type(error).__name__}: {error}"
        if value:
            detail = detail.replace(value, "***")
        return CredentialError(
            f"The keyring backend {self.info.name} failed to {action} credential "
            f"{nickname!r} ({detail}). Check that the keychain is running and "
            "unlocked."
        )
