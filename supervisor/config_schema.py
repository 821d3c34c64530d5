"""The config file's schema as frozen msgspec Structs.

A config is decoded once into these Structs, after `config_checks` has
checked every key. Durations are floats in seconds, sizes are ints in bytes,
paths are absolute, and `stop_signal` is a full name such as "SIGTERM".
Equal configs compare equal, which is what `diff_configs` relies on.

Import these names from `supervisor.config`, which re-exports them.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from supervisor.model import OnUnhealthy, OverlapPolicy, RestartPolicy, TriggerMode

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
CredentialBackend = Literal["auto", "keyring", "file"]

DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024


class DaemonSettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The `[runvisor]` table.

    `data_dir` and `socket` are absolute. When the file leaves them out, the
    loader fills in the user data dir and `$XDG_RUNTIME_DIR/runvisor/control.sock`
    (or `<data_dir>/control.sock` without `XDG_RUNTIME_DIR`).
    """

    data_dir: str
    socket: str
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_backups: int = 3
    history_keep: int = 100
    log_level: LogLevel = "info"


class CredentialSettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The `[credentials]` table."""

    backend: CredentialBackend = "auto"


class Backoff(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delays between restarts of an `always_running` project, in seconds.

    The delay starts at `initial`, is multiplied by `factor` after each
    restart up to `max`, and returns to `initial` once a run has stayed up for
    `reset_after`.
    """

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0
    reset_after: float = 60.0


class HealthConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The health probe of an `always_running` project.

    Exactly one of `exec` (a command, healthy on exit 0), `http` (an http://
    URL, healthy on 2xx and 3xx) and `tcp` ("host:port", healthy on connect)
    is set. Durations are in seconds.
    """

    exec: str | None = None
    http: str | None = None
    tcp: str | None = None
    interval: float = 10.0
    timeout: float = 1.0
    start_period: float = 0.0
    failure_threshold: int = 3
    success_threshold: int = 1
    on_unhealthy: OnUnhealthy = OnUnhealthy.RESTART


# The file writes `{ credential = "..." }` and `{ value = "..." }` without a
# tag. The loader adds `kind` from the key used, because msgspec can only
# decode a union of several Structs when they are tagged.


class CredentialRef(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="kind",
    tag="credential",
):
    """An environment value read from the credential backend by nickname."""

    credential: str


class SecretValue(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="kind",
    tag="value",
):
    """A secret literal from the config file. Its repr masks the value."""

    value: str

    def __repr__(self) -> str:
        return "SecretValue(value='***')"


# A plain string is a value that is not secret.
EnvValue = str | CredentialRef | SecretValue


class ProjectConfig(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """One `[projects.NAME]` table. Durations are in seconds.

    Keys that belong to another trigger mode keep their defaults, because the
    loader rejects a file that sets them.
    """

    name: str
    path: str
    command: str = "./run.sh"
    trigger: TriggerMode
    description: str = ""

    # schedule only
    cron: str | None = None
    timezone: str | None = None
    catch_up: bool = False
    jitter: float = 0.0
    prestart: float = 2.0

    # manual and schedule
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    timeout: float | None = None

    # always_running only
    restart: RestartPolicy = RestartPolicy.ALWAYS
    success_exit_codes: tuple[int, ...] = (0,)
    start_seconds: float = 1.0
    backoff: Backoff = msgspec.field(default_factory=Backoff)
    max_retries: int = 5
    restart_limit: int = 10
    restart_window: float = 60.0
    health: HealthConfig | None = None

    # every mode
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    env: dict[str, EnvValue] = {}
    keep_env_file: bool = False


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole config file. `projects` keeps the order of the file."""

    source: str
    runvisor: DaemonSettings
    credentials: CredentialSettings = msgspec.field(default_factory=CredentialSettings)
    projects: dict[str, ProjectConfig] = {}


class ConfigDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Project names sorted by what a reload does to them.

    `settings_changed` is true when `[runvisor]` or `[credentials]` differ.
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    settings_changed: bool = False
