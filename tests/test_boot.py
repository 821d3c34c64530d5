"""Runs that `runvisor serve` starts before its event loop (supervisor.boot).

Real bash children, a real history database file, real Unix sockets, and
the real `runvisor serve` where the daemon takes the runs over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import trio

from supervisor.boot import DAEMON_SIGNALS, DATABASE_NAME, boot
from supervisor.config import load_config
from supervisor.daemon import Daemon
from supervisor.database import Database
from supervisor.errors import ControlError, StoreError
from supervisor.model import RunRecord, RunStatus, RunTrigger
from supervisor.process import is_alive

from .daemon_process import DaemonProcess, wait_until
from .helpers import runvisor_argv
from .test_realtime import write_config

# What each project's script reports as soon as it starts: its pid, its
# run's markers, and a variable read back from `.env.local`.
SCRIPT = """\
#!/usr/bin/env bash
source .env.local
echo "$$ $RUNVISOR_RUN_ID $RUNVISOR_TRIGGER $GREETING" > started
echo "up as $$"
exec sleep 1000
"""


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """Give back the handlers that `boot` replaces in this process."""
    saved = {signum: signal.getsignal(signum) for signum in DAEMON_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def make_project(root: Path, name: str, script: str = SCRIPT) -> Path:
    folder = root / name
    folder.mkdir()
    run = folder / "run.sh"
    run.write_text(script)
    run.chmod(0o755)
    return folder


def started_line(folder: Path) -> list[str]:
    """Wait for the line the script writes at its start; return its words."""
    report = folder / "started"
    wait_until(lambda: report.exists() and report.read_text().endswith("\n"))
    return report.read_text().split()


def mixed_projects(tmp_path: Path) -> str:
    for name in ("plain", "keyed", "nightly"):
        make_project(tmp_path, name)
    return f"""
        [projects.plain]
        path = "{tmp_path / "plain"}"
        trigger = "always_running"
        env = {{ GREETING = "hi", TOKEN = {{ value = "hush-now" }} }}

        [projects.keyed]
        path = "{tmp_path / "keyed"}"
        trigger = "always_running"
        env = {{ GREETING = {{ credential = "greeting" }} }}

        [projects.nightly]
        path = "{tmp_path / "nightly"}"
        trigger = "schedule"
        cron = "0 3 * * *"

        [projects.missing]
        path = "{tmp_path / "nowhere"}"
        trigger = "always_running"
    """


# -- boot() on its own ------------------------------------------------------


def test_boot_starts_plain_always_running(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path, mixed_projects(tmp_path)))
    booted = boot(config)
    try:
        assert [run.project.name for run in booted.runs] == ["plain"]
        run = booted.runs[0]
        assert run.secrets == ("hush-now",)
        pid, run_id, trigger, greeting = started_line(tmp_path / "plain")
        assert (int(pid), run_id, trigger, greeting) == (
            run.popen.pid,
            "1",
            "startup",
            "hi",
        )
        # A new session, so the run's group can be stopped whole.
        assert os.getpgid(run.popen.pid) == run.popen.pid
        for name in ("keyed", "nightly"):
            assert not (tmp_path / name / "started").exists()
    finally:
        booted.close()
    assert not is_alive(run.popen.pid)
    assert not (tmp_path / "plain" / ".env.local").exists()


def test_boot_numbers_after_history(tmp_path: Path) -> None:
    make_project(tmp_path, "plain")
    config = load_config(
        write_config(
            tmp_path,
            f"""
            [projects.plain]
            path = "{tmp_path / "plain"}"
            trigger = "always_running"
            """,
        )
    )
    database = Database.open(tmp_path / "data" / DATABASE_NAME)
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    database.write_batch(
        [
            RunRecord(
                id=41,
                project="plain",
                trigger=RunTrigger.MANUAL,
                status=RunStatus.SUCCEEDED,
                started_at=stamp,
                ended_at=stamp,
            )
        ],
        [],
    )
    database.close()
    booted = boot(config)
    try:
        assert [run.run_id for run in booted.runs] == [42]
    finally:
        booted.close()


def test_boot_waits_for_leftovers(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path, mixed_projects(tmp_path)))
    leftover = subprocess.Popen(
        ["sleep", "1000"],
        env={**os.environ, "RUNVISOR_DATA_DIR": str(tmp_path / "data")},
    )
    try:
        booted = boot(config)
        try:
            assert booted.runs == []
        finally:
            booted.close()
    finally:
        leftover.kill()
        leftover.wait()


def test_boot_refuses_unreadable_history(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, mixed_projects(tmp_path)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / DATABASE_NAME).write_bytes(b"not a database, " * 100)
    with pytest.raises(StoreError, match="Cannot open the database") as raised:
        boot(config)
    assert "move it aside" in str(raised.value)
    assert not (tmp_path / "plain" / "started").exists()
    # Nothing stays taken: a second try gets as far again.
    with pytest.raises(StoreError, match="Cannot open the database"):
        boot(config)


def test_second_boot_refused(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, mixed_projects(tmp_path))
    config = load_config(path)
    first = boot(config)
    try:
        with pytest.raises(ControlError, match=r"control\.sock"):
            boot(config)
        other_socket = msgspec.structs.replace(
            config,
            runvisor=msgspec.structs.replace(
                config.runvisor, socket=str(tmp_path / "other.sock")
            ),
        )
        with pytest.raises(StoreError, match="Another runvisor daemon"):
            boot(other_socket)
        # Neither refused boot started a second run.
        assert len(first.runs) == 1
        assert started_line(tmp_path / "plain")[0] == str(first.runs[0].popen.pid)
    finally:
        first.close()


# -- the daemon takes the runs over ------------------------------------------


def history(daemon: DaemonProcess, name: str) -> list[dict]:  # type: ignore[type-arg]
    result = daemon.cli("history", name, "--json")
    assert result.returncode == 0, result.stderr
    runs: list[dict] = json.loads(result.stdout)  # type: ignore[type-arg]
    return runs


def test_serve_adopts_early_runs(tmp_path: Path) -> None:
    make_project(tmp_path, "plain")
    make_project(tmp_path, "keyed")
    daemon = DaemonProcess(
        tmp_path,
        f"""
        [credentials]
        backend = "file"

        [projects.plain]
        path = "{tmp_path / "plain"}"
        trigger = "always_running"
        start_seconds = 0.2
        env = {{ GREETING = "hi" }}

        [projects.keyed]
        path = "{tmp_path / "keyed"}"
        trigger = "always_running"
        env = {{ GREETING = {{ credential = "greeting" }} }}
        """,
    )
    daemon.start()
    try:
        pid, run_id, trigger, _ = started_line(tmp_path / "plain")
        assert (run_id, trigger) == ("1", "startup")
        runs = wait_until(
            lambda: [run for run in history(daemon, "plain") if run["pid"]]
        )
        assert [(run["id"], run["trigger"], run["pid"]) for run in runs] == [
            (1, "startup", int(pid))
        ]
        # What the script printed before the daemon ran reached its log.
        wait_until(
            lambda: f"up as {pid}" in daemon.cli("logs", "plain").stdout, timeout=5
        )
        log = daemon.log.read_text()
        assert "started before the event loop: 1 always-running projects" in log
        # The project mapping a credential started once the daemon ran, and
        # failed, since the credential is not stored.
        keyed = wait_until(lambda: history(daemon, "keyed"))
        assert keyed[0]["id"] == 2
        assert not (tmp_path / "keyed" / "started").exists()

        # The early run is supervised like any other: a kill restarts it.
        os.kill(int(pid), signal.SIGKILL)
        restarted = started_line_after(tmp_path / "plain", pid)
        assert restarted[2] == "restart"
        status = json.loads(daemon.cli("status", "plain", "--json").stdout)
        assert status["projects"][0]["state"] in ("starting", "running")
    finally:
        daemon.stop()
    assert not is_alive(int(pid))
    assert not is_alive(int(restarted[0]))
    assert not (tmp_path / "plain" / ".env.local").exists()


def started_line_after(folder: Path, old_pid: str) -> list[str]:
    report = folder / "started"
    wait_until(
        lambda: (
            report.read_text().endswith("\n")
            and report.read_text().split()[0] != old_pid
        )
    )
    return report.read_text().split()


def plain_daemon(tmp_path: Path) -> tuple[DaemonProcess, Path]:
    """Return a daemon, not started, of one always-running project, and
    that project's folder."""
    folder = make_project(tmp_path, "plain")
    daemon = DaemonProcess(
        tmp_path,
        f"""
        [projects.plain]
        path = "{folder}"
        trigger = "always_running"
        """,
    )
    return daemon, folder


def test_newer_history_starts_nothing(tmp_path: Path) -> None:
    daemon, folder = plain_daemon(tmp_path)
    # A history of a newer runvisor, which this one refuses.
    Database.open(daemon.data_dir / DATABASE_NAME).close()
    with sqlite3.connect(daemon.data_dir / DATABASE_NAME) as database:
        database.execute("PRAGMA user_version = 99")
    database.close()
    result = subprocess.run(
        [*daemon_argv(daemon), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "newer runvisor" in result.stderr
    assert not (folder / "started").exists()
    assert not (folder / ".env.local").exists()


def test_failed_start_ends_escaped_processes(tmp_path: Path) -> None:
    # The run leaves its group, ignoring SIGTERM, as a daemonizing script
    # would; the early run's end must find it by its markers.
    folder = make_project(
        tmp_path,
        "plain",
        SCRIPT.replace(
            "exec sleep 1000",
            'setsid bash -c \'trap "" TERM; echo $$ > escaped; exec -a '
            "t0-boot-escaped sleep 1000' &\nexec sleep 1000",
        ),
    )
    config = load_config(
        write_config(
            tmp_path,
            f"""
            [projects.plain]
            path = "{folder}"
            trigger = "always_running"
            """,
        )
    )
    booted = boot(config)
    escaped = folder / "escaped"
    wait_until(lambda: escaped.exists() and escaped.read_text().endswith("\n"))
    leader = booted.runs[0].popen.pid
    booted.close()
    assert not is_alive(leader)
    # SIGKILL reaches it at once, but its end may take a moment.
    wait_until(lambda: not is_alive(int(escaped.read_text())), timeout=5)


def daemon_argv(daemon: DaemonProcess) -> list[str]:
    return [*runvisor_argv(), "--config", str(daemon.config)]


def test_sigterm_during_boot_stops_runs(tmp_path: Path) -> None:
    daemon, folder = plain_daemon(tmp_path)
    serve = subprocess.Popen(
        [*daemon_argv(daemon), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # As soon as the run started: the daemon is still importing trio.
        pid = int(started_line(folder)[0])
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, err
    assert not is_alive(pid)
    database = Database.open(daemon.data_dir / DATABASE_NAME)
    try:
        runs = database.history(project="plain")
    finally:
        database.close()
    assert [(run.id, run.trigger, run.status) for run in runs] == [
        (1, RunTrigger.STARTUP, RunStatus.STOPPED)
    ]


async def test_unclaimed_early_run_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    folder = make_project(tmp_path, "plain")
    path = write_config(
        tmp_path,
        f"""
        [projects.plain]
        path = "{folder}"
        trigger = "always_running"
        """,
    )
    booted = boot(load_config(path))
    early = booted.runs[0]
    # As if the config the run was started for were not the daemon's.
    early.project = msgspec.structs.replace(early.project, start_seconds=7.0)
    daemon = Daemon(path, boot=booted)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        assert daemon.manager is not None
        runner = daemon.manager.runner("plain")
        with trio.fail_after(10):
            while early.popen.returncode is None or not runner.runs:
                await trio.sleep(0.02)
        assert early.popen.returncode == -signal.SIGKILL
        assert list(runner.runs) == [2]
        assert (
            "early run discarded: project=plain run=1 its project did not start "
            "with it; the run id is skipped"
        ) in caplog.text
        daemon.request_shutdown()
    booted.close()


def test_unrecorded_leftover_recorded_lost(tmp_path: Path) -> None:
    daemon, folder = plain_daemon(tmp_path)
    booted = boot(load_config(daemon.config))
    early = booted.runs[0]
    pid = int(started_line(folder)[0])
    # As if the daemon died right after starting the run, before its row.
    booted.runs = []
    booted.close()
    (folder / "started").unlink()
    daemon.start()
    try:
        new_pid = int(started_line(folder)[0])
        runs = wait_until(
            lambda: len(history(daemon, "plain")) == 2 and history(daemon, "plain")
        )
        assert [(run["id"], run["trigger"], run["status"]) for run in runs] == [
            (2, "startup", "running"),
            (1, "startup", "lost"),
        ]
        assert "before it recorded the run" in runs[1]["reason"]
        assert new_pid != pid
        assert not is_alive(pid)
    finally:
        daemon.stop()
        early.popen.wait()
        os.close(early.stdout)
        os.close(early.stderr)


def test_boot_refuses_damaged_history(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, mixed_projects(tmp_path)))
    path = tmp_path / "data" / DATABASE_NAME
    Database.open(path).close()
    with path.open("r+b") as file:
        # Over the pages of the runs table, past the file's header page.
        file.seek(4096)
        file.write(b"\xff" * 3000)
    with pytest.raises(StoreError, match="move it aside"):
        boot(config)
    assert not (tmp_path / "plain" / "started").exists()
