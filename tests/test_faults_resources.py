"""Resources running out under a real `runvisor serve`.

- The log disk fills up (a 2 MiB tmpfs mounted on the logs folder): runs
  keep running, each run reports the failure once, and writing resumes when
  space returns.
- Another process holds the database with `BEGIN EXCLUSIVE`: runs start and
  end as usual, status requests get their replies, and the rows land once the lock
  goes.
- The data dir cannot be written at start: a clear error naming the path,
  a non-zero exit code and no traceback.
- Hundreds of projects under a low file descriptor limit: the daemon says
  which runs it could not start and why, keeps the others running, and
  stays reachable on its control socket.

Mounting needs root. Where mounting fails, those tests skip and say so.
"""

from __future__ import annotations

import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from trio.testing import MockClock

from supervisor.control import Client
from supervisor.errors import RunvisorError
from supervisor.model import ProjectState
from supervisor.protocol import ActionReply, TriggerRequest
from supervisor.runner import ProjectRunner

from .daemon_harness import running_daemon
from .fault_tools import (
    Monitor,
    daemon_process,
    fault_count,
    is_alive,
    query,
    run_processes,
    socket_path,
    wait_until,
    write_config,
)
from .helpers import write_script

PROJECTS = fault_count("RUNVISOR_FAULT_PROJECTS", 300)
DESCRIPTOR_LIMIT = 256


def trigger(config: Path, name: str) -> ActionReply:
    with Client.connect(socket_path(config)) as client:
        reply = client.request(TriggerRequest(name=name), timeout=30)
    assert isinstance(reply, ActionReply)
    return reply


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed: {result.stderr.strip()}")


def unmount(path: Path) -> None:
    # Lazy, so a file that a process still has open cannot keep it mounted.
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    logs = tmp_path / "data" / "logs"
    logs.mkdir(parents=True)
    mount("-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(logs))
    try:
        yield logs
    finally:
        unmount(logs)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` with one file; return it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_log_disk_full_then_space_returns(tmp_path: Path, small_tmpfs: Path) -> None:
    write_script(
        tmp_path / "chatty",
        """
        i=0
        while :; do echo "line $i"; i=$((i+1)); sleep 0.01; done
        """,
    )
    write_script(tmp_path / "burst", "for i in $(seq 2000); do echo burst $i; done")
    config = write_config(
        tmp_path,
        f"""
        [projects.chatty]
        trigger = "always_running"
        path = "{tmp_path / "chatty"}"

        [projects.burst]
        trigger = "manual"
        path = "{tmp_path / "burst"}"
        """,
    )
    db = tmp_path / "data" / "runvisor.db"
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        chatty = wait_until(lambda: run_processes(daemon.tag))[0]
        # The row gets its pid from a write after the spawn, so the process
        # can be seen before the row has it.
        ((chatty_pid,),) = wait_until(
            lambda: query(
                db,
                "SELECT pid FROM runs WHERE id = ? AND pid IS NOT NULL",
                [chatty.run_id],
            )
        )
        chatty_log = small_tmpfs / "chatty" / f"{chatty.run_id}.log"
        wait_until(chatty_log.exists)

        filler = fill(small_tmpfs)
        wait_until(lambda: "Cannot write the log file" in daemon.log_text())
        burst = trigger(config, "burst")
        wait_until(
            lambda: (
                query(db, "SELECT status FROM runs WHERE id = ?", [burst.run_id])
                == [("succeeded",)]
            )
        )
        ((burst_reason,),) = query(
            db, "SELECT reason FROM runs WHERE id = ?", [burst.run_id]
        )
        time.sleep(0.5)
        assert is_alive(chatty_pid)
        size_while_full = chatty_log.stat().st_size

        filler.unlink()
        wait_until(lambda: chatty_log.stat().st_size > size_while_full + 100)
        wait_until(lambda: "works again" in daemon.log_text())
        assert is_alive(chatty_pid)
        assert daemon.stop() == 0
        log_text = daemon.log_text()

    warnings = [
        line for line in log_text.splitlines() if "Cannot write the log file" in line
    ]
    assert len(warnings) == 2, warnings
    assert sum(f"chatty/{chatty.run_id}.log" in line for line in warnings) == 1
    assert sum(f"burst/{burst.run_id}.log" in line for line in warnings) == 1
    dropped = [line for line in log_text.splitlines() if "were not written" in line]
    assert len(dropped) == 2, dropped
    assert "Traceback" not in log_text
    assert re.fullmatch(
        r"exit code 0; \d+ log lines? dropped: No space left on device", burst_reason
    ), burst_reason
    last_text = chatty_log.read_text().splitlines()[-1]
    assert " out line " in last_text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_database_locked_by_another_process(tmp_path: Path) -> None:
    write_script(tmp_path / "steady", "exec -a fault-steady sleep 1000")
    write_script(
        tmp_path / "job",
        'echo "$RUNVISOR_RUN_ID $(date +%s.%N)" >> ../ran.log\necho done',
    )
    config = write_config(
        tmp_path,
        f"""
        [projects.steady]
        trigger = "always_running"
        path = "{tmp_path / "steady"}"

        [projects.job]
        trigger = "manual"
        path = "{tmp_path / "job"}"
        """,
    )
    db = tmp_path / "data" / "runvisor.db"
    ran = tmp_path / "ran.log"
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        (steady,) = wait_until(lambda: run_processes(daemon.tag))

        with Monitor(socket_path(config), daemon.pid) as monitor:
            locker = sqlite3.connect(db, isolation_level=None, timeout=10)
            locker.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            run_ids = []
            for count in range(1, 4):
                requested = time.monotonic()
                reply = trigger(config, "job")
                run_ids.append(reply.run_id)
                wait_until(
                    lambda count=count: (
                        ran.exists() and len(ran.read_text().splitlines()) == count
                    ),
                    timeout=10,
                )
                # A locked database delays a start by two seconds at most.
                assert time.monotonic() - requested < 4.0
                wait_until(lambda: monitor.last is not None and job_idle(monitor))
            # Past the busy timeout of 5 s, so every write attempt failed.
            time.sleep(max(0.0, 6.0 - (time.monotonic() - locked_at)))
            assert query(db, "SELECT count(*) FROM runs WHERE project = 'job'") == [
                (0,)
            ]
            locker.execute("ROLLBACK")
            locker.close()
            wait_until(
                lambda: (
                    query(db, "SELECT count(*) FROM runs WHERE status = 'succeeded'")
                    == [(3,)]
                ),
                timeout=40,
            )
        monitor.check()
        states = {project.name: project.state for project in monitor.last.projects}
        assert is_alive(steady.pid)
        assert daemon.stop() == 0
        log_text = daemon.log_text()

    assert states == {"steady": ProjectState.RUNNING, "job": ProjectState.EXITED}
    rows = query(db, "SELECT id, status FROM runs WHERE project = 'job' ORDER BY id")
    assert rows == [(run_id, "succeeded") for run_id in run_ids]
    # The store logs the first failed write with its traceback, by design;
    # nothing else may fail.
    assert "failed inside runvisor" not in log_text
    assert "internal error" not in log_text
    assert log_text.count("Failed to write") == 1
    assert "works again" in log_text


async def test_project_broken_inside_runvisor_rejects_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_clock: MockClock
) -> None:
    # Stands in for any bug in a runner: the project's task ends with an
    # exception, and the daemon keeps serving the other projects.
    async def broken_prune(self: ProjectRunner) -> None:
        raise RuntimeError("a bug in a runner")

    monkeypatch.setattr(ProjectRunner, "_prune", broken_prune)
    write_script(tmp_path / "job", "echo done")
    async with running_daemon(
        tmp_path,
        f"""
        [projects.job]
        trigger = "manual"
        path = "{tmp_path / "job"}"
        """,
    ) as daemon:
        daemon.manager.trigger("job")
        await daemon.wait_state("job", ProjectState.FATAL)
        with pytest.raises(RunvisorError, match="Restart the daemon") as caught:
            daemon.manager.trigger("job")
    assert "a bug in a runner" in str(caught.value)


def job_idle(monitor: Monitor) -> bool:
    assert monitor.last is not None
    (job,) = [project for project in monitor.last.projects if project.name == "job"]
    return job.run_id is None


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_start_error(config: Path, path: Path) -> None:
    result = serve_once(config)
    assert result.returncode == 1, result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("runvisor: ")


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("a file where the data dir should be\n")
    config = write_config(tmp_path, "", data_dir=data)
    check_start_error(config, data)


def test_data_dir_below_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    config = write_config(tmp_path, "", data_dir=blocker / "data")
    check_start_error(config, blocker / "data")


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only"
    folder.mkdir()
    mount("--bind", str(folder), str(folder))
    try:
        mount("-o", "remount,bind,ro", str(folder))
        yield folder
    finally:
        unmount(folder)


def test_data_dir_on_a_read_only_mount(tmp_path: Path, read_only_folder: Path) -> None:
    # As root, permission bits stop nothing, but a read-only mount does.
    config = write_config(tmp_path, "", data_dir=read_only_folder / "data")
    check_start_error(config, read_only_folder / "data")
    config = write_config(tmp_path, "", data_dir=read_only_folder)
    check_start_error(config, read_only_folder)


def lower_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hundreds_of_projects_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    projects = ""
    for index in range(PROJECTS):
        name = f"p{index:03d}"
        write_script(tmp_path / name, "exec -a fault-many sleep 1000")
        projects += f"""
        [projects.{name}]
        trigger = "always_running"
        path = "{tmp_path / name}"
        max_retries = 2
        backoff = {{ initial = "0.1s", max = "0.2s" }}
        """
    config = write_config(tmp_path, projects)
    db = tmp_path / "data" / "runvisor.db"
    with daemon_process(tmp_path, config, preexec_fn=lower_descriptor_limit) as daemon:
        daemon.start(timeout=60)
        with Monitor(socket_path(config), daemon.pid) as monitor:

            def settled() -> bool:
                if monitor.last is None:
                    return False
                states = {project.state for project in monitor.last.projects}
                return states <= {ProjectState.RUNNING, ProjectState.FATAL}

            wait_until(settled, timeout=120)
            assert monitor.last is not None
            running = {
                project.name: project.pid
                for project in monitor.last.projects
                if project.state == ProjectState.RUNNING
            }
            fatal = [
                project
                for project in monitor.last.projects
                if project.state == ProjectState.FATAL
            ]
            time.sleep(1.0)
            still = {
                project.name: project.pid
                for project in monitor.last.projects
                if project.state == ProjectState.RUNNING
            }
            open_descriptors = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        monitor.check()
        assert daemon.stop(timeout=60) == 0
        log_text = daemon.log_text()
        assert run_processes(daemon.tag) == []

    print(
        f"{PROJECTS} projects under a limit of {DESCRIPTOR_LIMIT} descriptors: "
        f"{len(running)} running, {len(fatal)} gave up; {open_descriptors} open"
    )
    assert still == running
    assert len(running) >= 20
    assert len(fatal) == PROJECTS - len(running)
    reasons = {
        reason
        for (reason,) in query(
            db, "SELECT DISTINCT reason FROM runs WHERE status = 'failed'"
        )
    }
    assert reasons
    assert all("file descriptors" in reason for reason in reasons), reasons
    assert all("LimitNOFILE" in reason for reason in reasons), reasons
    assert "Traceback" not in log_text
