"""Stop and shutdown timings in real time, with the real signals.

The mock-clock tests prove the logic; these check the promised timings with
the wall clock: a process that ignores SIGTERM is killed at the stop
timeout, and a SIGTERM to the daemon leaves no descendant of any run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import trio

from supervisor.daemon import Daemon
from supervisor.database import Database
from supervisor.logs import read_run_log, run_log_path
from supervisor.model import ProjectState, RunStatus

from .helpers import marked_pids, wait_until_gone, write_script


def write_config(tmp_path: Path, projects: str) -> Path:
    path = tmp_path / "runvisor.toml"
    path.write_text(
        f'[runvisor]\ndata_dir = "{tmp_path / "data"}"\n'
        f'socket = "{tmp_path / "control.sock"}"\n' + textwrap.dedent(projects)
    )
    return path


async def test_deaf_process_stays_stopping_until_killed(tmp_path: Path) -> None:
    write_script(
        tmp_path / "deaf",
        """
        trap '' TERM INT HUP
        exec -a f02-deaf bash -c 'while :; do echo tick; sleep 0.5; done'
        """,
    )
    config = write_config(
        tmp_path,
        f"""
        [projects.deaf]
        path = "{tmp_path / "deaf"}"
        trigger = "manual"
        stop_timeout = "3s"
        """,
    )
    daemon = Daemon(config)
    samples: list[tuple[float, ProjectState, bool]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        assert daemon.manager is not None
        runner = daemon.manager.runner("deaf")
        runner.trigger()
        await trio.sleep(2)
        stopped_at = trio.current_time()

        async def sample() -> None:
            while True:
                samples.append(
                    (
                        trio.current_time() - stopped_at,
                        runner.state,
                        bool(marked_pids("f02-")),
                    )
                )
                await trio.sleep(0.1)

        nursery.start_soon(sample)
        await runner.stop()
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()

    before_kill = [s for s in samples if 0.05 < s[0] < 2.9]
    assert before_kill
    assert all(state == ProjectState.STOPPING for _, state, _ in before_kill)
    assert all(alive for _, _, alive in before_kill)
    after = [s for s in samples if s[0] > 3.6]
    assert after
    assert all(state == ProjectState.STOPPED and not alive for _, state, alive in after)
    assert marked_pids("f02-") == []

    database = Database.open(tmp_path / "data" / "runvisor.db")
    (run,) = database.history("deaf")
    database.close()
    assert run.status == RunStatus.STOPPED
    assert run.signal == signal.SIGKILL
    assert "killed with SIGKILL after stop_timeout = 3s" in run.reason
    assert run.ended_at is not None
    lasted = (run.ended_at - run.started_at).total_seconds()
    assert 4.5 <= lasted <= 5.6  # 2 s of running, then 3 s ± 0.5 of grace
    records = read_run_log(run_log_path(tmp_path / "data" / "logs", "deaf", run.id))
    last_tick = max(record.at for record in records)
    assert (last_tick - run.started_at).total_seconds() <= 5.5


def test_sigterm_to_daemon_leaves_no_descendant(tmp_path: Path) -> None:
    write_script(
        tmp_path / "tree",
        """
        # bash stays the parent (no exec), like a wrapper script
        (exec -a f01-bg sleep 1000) &
        (exec -a f01-pipe-a sleep 1000) | (exec -a f01-pipe-b cat) &
        wait
        """,
    )
    config = write_config(
        tmp_path,
        f"""
        [projects.tree]
        path = "{tmp_path / "tree"}"
        trigger = "always_running"
        restart = "always"
        stop_timeout = "3s"
        """,
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--config", str(config), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while len(marked_pids("f01-")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(marked_pids("f01-")) == 3
        requested = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        assert wait_until_gone("f01-", timeout=4 - (time.monotonic() - requested)) == []
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    stderr = log_path.read_text()
    assert "stopped: project=tree" in stderr
    assert "the daemon is shutting down" in stderr
    assert "spawned: project=tree run=2" not in stderr
