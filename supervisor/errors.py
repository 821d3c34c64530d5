"""Exceptions raised by runvisor.

    RunvisorError                 base of everything below
    ├── ConfigError               invalid config file; carries every problem found
    ├── CronError                 invalid cron expression or time zone
    ├── StoreError                the SQLite database cannot be opened or written
    ├── CredentialError           a credential cannot be stored or resolved
    │   └── BackendUnavailable    no usable credential backend
    ├── SpawnError                a run could not be started (folder, run.sh, exec)
    ├── ControlError              control socket failures
    │   ├── DaemonNotRunning      nothing listens on the control socket
    │   └── ProtocolError         malformed or oversized frame
    ├── UnknownProject            a request names a project not in the config
    └── ExportError               a project cannot be exported to another engine

Messages are whole sentences that name the value and say what to do.
"""

from __future__ import annotations


class RunvisorError(Exception):
    """Base class of every error runvisor raises on purpose."""


class ConfigError(RunvisorError):
    """Invalid config. `problems` holds one message per problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CronError(RunvisorError):
    pass


class StoreError(RunvisorError):
    pass


class CredentialError(RunvisorError):
    pass


class BackendUnavailable(CredentialError):
    pass


class SpawnError(RunvisorError):
    pass


class ControlError(RunvisorError):
    pass


class DaemonNotRunning(ControlError):
    pass


class ProtocolError(ControlError):
    pass


class UnknownProject(RunvisorError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"Project {name!r} is not in the config. "
            "Run 'runvisor status' to list the configured projects."
        )


class ExportError(RunvisorError):
    """A project uses a setting that the chosen export format cannot express."""
