"""Hostile projects against a real `runvisor serve`.

All of them run at once under one daemon. Their children ignore SIGTERM,
fork many grandchildren, leave their group with setsid, close stdout and
keep running, write one enormous line, write binary noise, or exit while
grandchildren hold their pipes. Meanwhile a monitor thread requests
`status` over the control socket and reads the daemon's RSS from /proc:
every reply must come within a second, and memory must stay bounded.
Every stop must leave no process of the run.

RUNVISOR_FAULT_LINE_MB sets the size of the single line (default 50) and
RUNVISOR_FAULT_GRANDCHILDREN the number of grandchildren (default 100).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from supervisor.control import Client
from supervisor.logs import MAX_LINE_BYTES, read_run_log, run_log_path
from supervisor.protocol import ActionReply, StopRequest, TriggerRequest

from .fault_tools import (
    STATUS_LIMIT_SECONDS,
    Monitor,
    daemon_process,
    fault_count,
    query,
    rss_kib,
    run_processes,
    socket_path,
    wait_until,
    write_config,
)
from .helpers import write_script

LINE_MB = fault_count("RUNVISOR_FAULT_LINE_MB", 50)
GRANDCHILDREN = fault_count("RUNVISOR_FAULT_GRANDCHILDREN", 100)
NOISE_MB = 20
# The daemon may grow by this much over its idle size, whatever the size of
# the line: far below a line that it would hold whole.
RSS_GROWTH_LIMIT_KIB = 40 * 1024

HOSTILE = {
    # Ignores SIGTERM: only SIGKILL at the stop timeout ends it.
    "deaf": """
        trap '' TERM
        exec -a fault-deaf bash -c "trap '' TERM; while :; do sleep 0.2; done"
        """,
    # Many grandchildren, each ignoring SIGTERM.
    "forker": f"""
        for i in $(seq {GRANDCHILDREN}); do
          (trap '' TERM; exec -a fault-fork sleep 1000) &
        done
        echo forked
        wait
        """,
    # Grandchildren that leave the process group, one of them deaf.
    "escaper": """
        setsid -f bash -c 'exec -a fault-escaped sleep 1000'
        setsid -f bash -c "trap '' TERM; exec -a fault-escaped-deaf sleep 1000"
        ( ( exec -a fault-daemonized sleep 1000 ) & )
        echo escaped
        exec -a fault-escaper sleep 1000
        """,
    # Closes both pipes and keeps running.
    "closer": """
        echo closing
        exec 1>&- 2>&-
        exec -a fault-closed sleep 1000
        """,
    # One line of LINE_MB megabytes, then one short line.
    "longline": f"""
        head -c {LINE_MB * 1_000_000} /dev/zero | tr '\\0' x
        echo
        echo after-the-long-line
        exec -a fault-longline sleep 1000
        """,
    "noise": f"""
        head -c {NOISE_MB * 1_000_000} /dev/urandom
        echo
        echo after-the-noise
        exec -a fault-noise sleep 1000
        """,
    # Exits at once; its grandchildren keep the pipes open, one of them
    # outside the group.
    "holder": """
        (exec -a fault-holder sleep 1000) &
        setsid -f bash -c 'exec -a fault-holder-setsid sleep 1000'
        echo bye
        exit 0
        """,
}


def request(socket: Path, message: TriggerRequest | StopRequest) -> ActionReply:
    with Client.connect(socket) as client:
        reply = client.request(message, timeout=60)
    assert isinstance(reply, ActionReply)
    return reply


def hostile_config(root: Path) -> str:
    text = ""
    for name, body in HOSTILE.items():
        write_script(root / name, body)
        text += f"""
        [projects.{name}]
        trigger = "manual"
        path = "{root / name}"
        stop_timeout = "1s"
        """
    return text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hostile_projects_all_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, hostile_config(tmp_path))
    socket = socket_path(config)
    db = tmp_path / "data" / "runvisor.db"
    logs = tmp_path / "data" / "logs"
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        idle_rss = rss_kib(daemon.pid)
        monitor = Monitor(socket, daemon.pid)
        monitor.start()
        try:
            run_ids = {}
            for name in HOSTILE:
                reply = request(socket, TriggerRequest(name=name))
                assert reply.run_id is not None, reply.message
                run_ids[name] = reply.run_id

            def names_running() -> set[str]:
                return {process.project for process in run_processes(daemon.tag)}

            # Every project reached its last act (the marker name).
            wait_until(
                lambda: (
                    len(run_processes(daemon.tag)) >= GRANDCHILDREN
                    and {"longline", "noise", "escaper", "closer"} <= names_running()
                ),
                timeout=120,
            )
            wait_until(
                lambda: (
                    query(
                        db, "SELECT status FROM runs WHERE id = ?", [run_ids["holder"]]
                    )
                    == [("succeeded",)]
                ),
                timeout=20,
            )
            handled = len(run_processes(daemon.tag))

            stopped = {}
            for name in HOSTILE:
                if name == "holder":
                    continue
                request(socket, StopRequest(name=name))
                stopped[name] = [
                    process.pid
                    for process in run_processes(daemon.tag)
                    if process.project == name
                ]
        finally:
            monitor.stop()
        assert daemon.stop() == 0
        log_text = daemon.log_text()

    print(
        f"{handled} hostile processes; status answered {len(monitor.latencies)} "
        f"times, slowest {max(monitor.latencies):.3f} s; RSS idle {idle_rss} KiB, "
        f"max {max(monitor.rss)} KiB"
    )
    assert stopped == {name: [] for name in stopped}
    assert monitor.failures == []
    assert max(monitor.latencies) < STATUS_LIMIT_SECONDS
    assert max(monitor.rss) - idle_rss < RSS_GROWTH_LIMIT_KIB
    assert "Traceback" not in log_text

    runs = dict(query(db, "SELECT project, status FROM runs"))
    assert runs["holder"] == "succeeded"
    assert {runs[name] for name in stopped} == {"stopped"}

    # The line is cut into records of at most MAX_LINE_BYTES, and rotation
    # keeps the log of the run within its files: 4 of 10 MiB by default.
    long_log = run_log_path(logs, "longline", run_ids["longline"])
    long_records = read_run_log(long_log)
    pieces = [record.text for record in long_records if set(record.text) == {"x"}]
    assert max(len(piece) for piece in pieces) <= MAX_LINE_BYTES
    assert long_records[-1].text == "after-the-long-line"
    log_bytes = sum(path.stat().st_size for path in long_log.parent.iterdir())
    assert log_bytes <= 4 * 10 * 1024 * 1024 + 2 * MAX_LINE_BYTES
    assert sum(len(piece) for piece in pieces) >= min(
        LINE_MB * 1_000_000, 3 * 10 * 1024 * 1024
    )
    noise_records = read_run_log(run_log_path(logs, "noise", run_ids["noise"]))
    assert noise_records[-1].text == "after-the-noise"
    closer_records = read_run_log(run_log_path(logs, "closer", run_ids["closer"]))
    assert [record.text for record in closer_records] == ["closing"]


def zombie_children(pid: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == pid:
            zombies.append(int(entry.name))
    return zombies


@pytest.mark.slow
def test_daemonized_grandchildren_are_reaped(tmp_path: Path) -> None:
    # Each setsid -f child is re-parented to the daemon, the child
    # subreaper, and exits soon after: a zombie unless the daemon reaps it.
    write_script(
        tmp_path / "spawner",
        f"""
        for i in $(seq {GRANDCHILDREN}); do setsid -f true; done
        echo spawned
        exec -a fault-spawner sleep 1000
        """,
    )
    config = write_config(
        tmp_path,
        f"""
        [projects.spawner]
        trigger = "always_running"
        path = "{tmp_path / "spawner"}"
        """,
    )
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        wait_until(
            lambda: any(
                process.project == "spawner" for process in run_processes(daemon.tag)
            )
        )
        # Every `true` has exited by now. Each one is a zombie for a moment
        # before the daemon reaps it.
        time.sleep(0.3)
        reaped = wait_until(lambda: not zombie_children(daemon.pid), timeout=5)
        assert daemon.stop() == 0
    assert reaped


@pytest.mark.slow
def test_reaping_keeps_exit_codes(tmp_path: Path) -> None:
    # Quick runs that exit with 3 while their daemonized children exit too:
    # the reaper must never take a run's own exit status.
    write_script(tmp_path / "quick", "setsid -f true\nsetsid -f true\nexit 3")
    config = write_config(
        tmp_path,
        f"""
        [projects.quick]
        trigger = "always_running"
        path = "{tmp_path / "quick"}"
        restart = "always"
        start_seconds = 0
        max_retries = 1000
        restart_limit = 1000
        backoff = {{ initial = "0.01s", max = "0.01s" }}
        """,
    )
    db = tmp_path / "data" / "runvisor.db"
    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        wait_until(
            lambda: (
                query(db, "SELECT count(*) FROM runs WHERE status = 'failed'")[0][0]
                >= 40
            ),
            timeout=30,
        )
        assert daemon.stop() == 0
    codes = query(db, "SELECT exit_code, count(*) FROM runs GROUP BY exit_code")
    statuses = {status for (status,) in query(db, "SELECT status FROM runs")}
    assert statuses <= {"failed", "stopped"}
    assert [code for code, _ in codes if code not in (3, None)] == []
