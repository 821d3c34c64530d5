"""A real Secret Service for tests: a private D-Bus session bus with
gnome-keyring-daemon on it, unlocked, in a fresh HOME.

The bus uses its own config. It listens in a temporary folder and activates
no services, so only the keyring started here is registered on it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 10.0

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={folder}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass(frozen=True)
class SecretService:
    address: str
    """The D-Bus address to put in DBUS_SESSION_BUS_ADDRESS."""
    home: Path


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        return ""
    return process.stdout.readline().decode().strip()


def _service_is_ready(address: str) -> bool:
    """Return whether the Secret Service is on the bus with its default
    collection unlocked.

    gnome-keyring registers its bus name before it has created the login
    collection, and a store into a missing default collection asks for a
    password prompt, which fails without a display.
    """
    import secretstorage
    from jeepney.io.blocking import open_dbus_connection

    try:
        with open_dbus_connection(bus=address) as connection:
            if not secretstorage.check_service_availability(connection):
                return False
            return not secretstorage.Collection(connection).is_locked()
    except (OSError, ValueError, secretstorage.exceptions.SecretStorageException):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def running_secret_service(folder: Path) -> Iterator[SecretService]:
    """Start a bus and an unlocked gnome-keyring-daemon, or skip the test
    with the reason they cannot start."""
    for program, package in (
        ("dbus-daemon", "dbus-daemon"),
        ("gnome-keyring-daemon", "gnome-keyring"),
    ):
        if shutil.which(program) is None:
            pytest.skip(
                f"{program} is not installed (Debian package {package}; "
                "scripts/system-deps.sh installs it)"
            )

    home = folder / "home"
    runtime = folder / "runtime"
    for path in (home, runtime):
        path.mkdir(parents=True, mode=0o700)
    config = folder / "bus.conf"
    config.write_text(_BUS_CONFIG.format(folder=runtime))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
    }

    bus = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    keyring_daemon: subprocess.Popen[bytes] | None = None
    try:
        address = _read_line(bus, START_TIMEOUT)
        if not address:
            pytest.skip("dbus-daemon did not print a bus address")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        keyring_daemon = subprocess.Popen(
            [
                "gnome-keyring-daemon",
                "--foreground",
                "--unlock",
                "--components=secrets",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert keyring_daemon.stdin is not None
        # --unlock reads the password of the login keyring from stdin and
        # creates that keyring, unlocked, when the fresh HOME has none.
        keyring_daemon.stdin.write(b"test-password")
        keyring_daemon.stdin.close()

        deadline = time.monotonic() + START_TIMEOUT
        while not _service_is_ready(address):
            if keyring_daemon.poll() is not None:
                pytest.skip(
                    f"gnome-keyring-daemon exited with {keyring_daemon.returncode}"
                )
            if time.monotonic() > deadline:
                pytest.skip(
                    f"gnome-keyring-daemon did not open its login keyring within "
                    f"{START_TIMEOUT:g} s"
                )
            time.sleep(0.05)
        yield SecretService(address=address, home=home)
    finally:
        if keyring_daemon is not None:
            _stop(keyring_daemon)
        _stop(bus)
