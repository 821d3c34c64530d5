"""The `.env.local` file that each run's script can `source`.

It has the run's mapped variables as `export NAME='value'` lines, is
written before the run starts and removed after it ends, and is private to
the daemon's user (mode 0600). No trio here: `runvisor serve` writes it for
the projects it starts before the event loop runs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from supervisor.credential_backends import check_secret
from supervisor.credential_file import write_private_file
from supervisor.errors import CredentialError

logger = logging.getLogger(__name__)

ENV_FILE_NAME = ".env.local"

# The config accepts only such names, and `.env.local` relies on it: a name
# is written unquoted after `export`.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def quote_for_bash(value: str) -> str:
    """Quote a value so that bash reads it back byte for byte.

    Inside single quotes bash takes every byte literally, newlines included;
    a single quote itself is written as '\\'' (close, escaped quote, reopen).
    """
    if "\0" in value:
        raise CredentialError("A value contains a NUL byte, which bash cannot hold.")
    return "'" + value.replace("'", "'\\''") + "'"


def format_env_file(variables: Mapping[str, str]) -> str:
    """Format `export NAME='value'` lines, one per variable.

    Raises CredentialError for a name that is not a shell variable name and
    for a value that bash cannot hold (a NUL byte) or that is not valid
    UTF-8 text. The message names the variable, never the value.
    """
    lines: list[str] = []
    for name, value in variables.items():
        if not _ENV_NAME.fullmatch(name):
            raise CredentialError(
                f"{name!r} is not a valid variable name: use letters, digits "
                "and '_', not starting with a digit."
            )
        check_secret(value, f"The value of {name}")
        lines.append(f"export {name}={quote_for_bash(value)}\n")
    return "".join(lines)


def write_env_file(folder: Path, variables: Mapping[str, str]) -> Path:
    """Write `.env.local` atomically, mode 0600 from its first byte.

    The content goes to a new temporary file in the same folder (created with
    O_EXCL and O_NOFOLLOW, so no planted file or symlink is written through)
    and is then renamed over `.env.local`. The rename replaces a symlink at
    that name instead of following it.
    """
    target = folder / ENV_FILE_NAME
    # Not flushed to disk: the file lives for one run and is written again
    # before the next, and a flush per run costs a burst of starts dearly.
    try:
        write_private_file(target, format_env_file(variables).encode(), durable=False)
    except IsADirectoryError:
        raise CredentialError(
            f"{target} is a folder, so the run's variables cannot be written "
            "there. Remove or rename that folder."
        ) from None
    return target


def remove_env_file(folder: Path, *, stale: bool = False) -> bool:
    """Remove the project's `.env.local` and return whether one was removed.

    A failure is logged, not raised, so that the run's history row is still
    written. `stale` marks a file left by a daemon killed during a run. A
    folder under that name is then left alone without a warning, because
    the project's next run reports it.
    """
    path = folder / ENV_FILE_NAME
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        if stale and isinstance(error, IsADirectoryError):
            return False
        logger.warning(
            "Failed to remove %s (%s): %s. Remove it by hand, because it "
            "contains the project's credentials.",
            path,
            "found at start-up" if stale else "after the run",
            error.strerror or error,
        )
        return False
    return True
