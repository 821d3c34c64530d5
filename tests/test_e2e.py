"""End to end: `runvisor serve` as a real process on a copy of the example
config, in real time.

These tests run the real command (from source, or the single executable when
RUNVISOR_BINARY is set) and read what it leaves: history, log files, the
example web server's answers, and the processes left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import daemon_pid, runvisor_argv

pytestmark = pytest.mark.frozen

REPOSITORY = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Example:
    """A copy of the example config and projects in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        shutil.copytree(REPOSITORY / "examples", root / "examples")
        text = (REPOSITORY / "config.example.toml").read_text()
        self.config = root / "runvisor.toml"
        self.config.write_text(text.replace("8787", str(self.port)))
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = root / "daemon.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*runvisor_argv(), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.root,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def start(self) -> subprocess.Popen[bytes]:
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [*runvisor_argv(), "--config", str(self.config), "serve"],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.daemon

    def history(self, name: str) -> list[dict[str, object]]:
        runs: list[dict[str, object]] = json.loads(
            self.cli("history", name, "--json").stdout
        )
        return runs

    def web_answer(self) -> str | None:
        try:
            url = f"http://127.0.0.1:{self.port}/"
            with urllib.request.urlopen(url, timeout=1) as response:
                body: bytes = response.read()
                return body.decode()
        except OSError:
            return None


def wait_until(condition, timeout: float = STARTUP_SECONDS, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Example]:
    example = Example(tmp_path)
    yield example
    if example.daemon is not None and example.daemon.poll() is None:
        example.daemon.kill()
        example.daemon.wait()
    # Whatever a failed test left of the web example.
    for run in _all_runs(example):
        pid = run.get("pid")
        if isinstance(pid, int) and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _all_runs(example: Example) -> list[dict[str, object]]:
    try:
        return example.history("web")
    except (AssertionError, json.JSONDecodeError, subprocess.SubprocessError):
        return []


def test_example_config_is_valid(example: Example) -> None:
    result = example.cli("config", "check")
    assert result.stdout.strip() == "ok"


def test_example_runs_and_restarts_after_kill(example: Example) -> None:
    daemon = example.start()
    answer = wait_until(example.web_answer)
    assert answer.startswith("web example, run ")

    first = wait_until(lambda: [r for r in example.history("web") if r["pid"]])[0]
    assert first["status"] == "running"
    assert first["trigger"] == "startup"
    os.kill(int(first["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

    def restarted() -> list[dict[str, object]]:
        # A run's row is written before its child exists, so it may show
        # as running without a pid for a moment.
        runs = example.history("web")
        return [
            r
            for r in runs
            if r["id"] != first["id"] and r["status"] == "running" and r["pid"]
        ]

    second = wait_until(restarted)[0]
    assert second["trigger"] == "restart"
    wait_until(
        lambda: (example.web_answer() or "").startswith(
            f"web example, run {second['id']},"
        )
    )
    killed = next(r for r in example.history("web") if r["id"] == first["id"])
    assert killed["status"] == "failed"
    assert killed["signal"] == signal.SIGKILL

    log = example.root / "data" / "logs" / "web" / f"{first['id']}.log"
    lines = log.read_text().splitlines()
    assert any(
        line.endswith(f"out listening on http://127.0.0.1:{example.port}")
        for line in lines
    )

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    assert not process_alive(int(second["pid"]))  # type: ignore[call-overload]
    final = next(r for r in example.history("web") if r["id"] == second["id"])
    assert final["status"] == "stopped"
    assert "ERROR" not in example.daemon_log.read_text()


def test_crashed_daemon_leaves_lost_runs_and_no_orphans(example: Example) -> None:
    daemon = example.start()
    wait_until(example.web_answer)
    first = wait_until(lambda: [r for r in example.history("web") if r["pid"]])[0]
    old_pid = int(first["pid"])  # type: ignore[call-overload]

    # SIGKILL to the real daemon: under the single executable that is the
    # bootloader's child, which SIGKILL to the bootloader would not reach.
    os.kill(daemon_pid(daemon.pid), signal.SIGKILL)
    daemon.kill()
    daemon.wait()
    assert process_alive(old_pid), "the run outlives a crashed daemon until restart"

    daemon = example.start()
    wait_until(lambda: not process_alive(old_pid))
    lost = next(r for r in example.history("web") if r["id"] == first["id"])
    assert lost["status"] == "lost"
    assert lost["ended_at"] is not None
    new = wait_until(
        lambda: [
            r for r in example.history("web") if r["status"] == "running" and r["pid"]
        ]
    )[0]
    assert new["id"] != first["id"]
    wait_until(example.web_answer)

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    assert not process_alive(int(new["pid"]))  # type: ignore[call-overload]


def test_invalid_config_exits_fast_with_the_error(example: Example) -> None:
    example.config.write_text(
        example.config.read_text().replace('cron = "* * * * *"', 'cron = "0 0 31 2 *"')
    )
    started = time.monotonic()
    result = subprocess.run(
        [*runvisor_argv(), "--config", str(example.config), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "projects.tick.cron" in result.stderr
    assert "0 0 31 2 *" in result.stderr
    assert elapsed < 5
