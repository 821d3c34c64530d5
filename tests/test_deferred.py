"""Deferred imports: the daemon keeps OpenSSL out until something uses it.

The stand-ins replace entries of `sys.modules`, so each check runs in a
fresh interpreter (the test process has imported ssl long ago).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .daemon_process import DaemonProcess
from .helpers import write_script


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_trio_imports_no_openssl_after_defer() -> None:
    result = run_python(
        """
        from supervisor.deferred import CRYPTO_MODULES, defer, is_loaded
        assert defer() == list(CRYPTO_MODULES)
        import trio
        import supervisor.daemon
        import sqlite_utils
        loaded = [name for name in CRYPTO_MODULES if is_loaded(name)]
        maps = open("/proc/self/maps").read()
        print(loaded, "libcrypto" in maps, "libssl" in maps)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[] False False"


def test_stand_in_loads_on_first_use() -> None:
    result = run_python(
        """
        from supervisor.deferred import defer, is_loaded
        defer()
        import ssl, hashlib
        import trio
        # Dunder reads, as tools walking sys.modules make, load nothing.
        assert getattr(ssl, "__file__", None) is None
        assert not is_loaded("ssl")
        context = ssl.create_default_context()
        assert is_loaded("ssl")
        import ssl as again
        assert isinstance(context, again.SSLContext)
        assert trio._ssl._stdlib_ssl.SSLError is again.SSLError
        assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf")
        from hmac import compare_digest
        assert compare_digest(b"a", b"a")
        import secrets
        assert len(secrets.token_hex(4)) == 8
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_defer_leaves_imported_modules_alone() -> None:
    result = run_python(
        """
        import sys, ssl
        from supervisor.deferred import defer, is_loaded
        deferred = defer()
        print("ssl" in deferred, is_loaded("ssl"), sys.modules["ssl"] is ssl)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False True True"


def test_daemon_maps_no_openssl(tmp_path: Path) -> None:
    # A daemon on a new data dir migrates its schema with sqlite-utils and
    # starts a run; neither needs OpenSSL, so libcrypto must not be mapped.
    write_script(tmp_path / "idle", "exec sleep 1000")
    daemon = DaemonProcess(
        tmp_path,
        f"""
        [projects.idle]
        path = "{tmp_path / "idle"}"
        trigger = "always_running"
        """,
    ).start()
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        deadline = time.monotonic() + 15
        while not children.read_text().split():
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        maps = Path(f"/proc/{pid}/maps").read_text()
    finally:
        daemon.stop()
    assert "libcrypto" not in maps
    assert "libssl" not in maps
