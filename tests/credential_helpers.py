"""Helpers for the credential tests: the real CLI as a subprocess, and the
environment of a host without a keychain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

# A password full of shell metacharacters, byte for byte.
HOSTILE_SECRET = (
    "p@ss w0rd'\"$HOME $(touch /tmp/f14-pwned) `touch /tmp/f14-pwned2` "
    ";|&<>*?[x] # tail x=y=z %s %(x)s C:\\new\\table\\u0142 ~root !!"
)


@dataclass
class Cli:
    config: Path
    env: dict[str, str]

    @property
    def data_dir(self) -> Path:
        return self.config.parent / "data"

    def run(
        self, *args: str, stdin: bytes = b"", check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            env=self.env,
            timeout=60,
        )
        if check:
            assert result.returncode == 0, result.stderr.decode()
        return result


def base_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a host without a keychain."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")
        and not name.startswith("RUNVISOR_CREDENTIALS")
    }
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["PYTHON_KEYRING_BACKEND"] = ""
    return env


def write_config(
    tmp_path: Path,
    backend: str = "auto",
    projects: str = "",
    name: str = "runvisor.toml",
) -> Path:
    """Write a config with its data dir in `tmp_path / "data"`."""
    path = tmp_path / name
    path.write_text(
        textwrap.dedent(
            f"""\
            [runvisor]
            data_dir = "{tmp_path / "data"}"
            socket = "{tmp_path / "control.sock"}"

            [credentials]
            backend = "{backend}"

            [projects]
            """
        )
        + textwrap.dedent(projects)
    )
    return path
