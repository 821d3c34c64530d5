"""Crashes of the daemon: kill -9 of a real `runvisor serve` at random moments.

Each cycle does something (lets runs start, reloads a changed config, requests
a shutdown, or just lets the runs write output), kills the daemon with
SIGKILL at a random moment of it, checks what the dead daemon left, starts
it again and checks that the new daemon cleaned up:

- no process of a run outlives the daemon that ran it past the restart,
- every run the dead daemon had going is `lost`, and every run in the
  database ends with a final status,
- every run that a child saw (its RUNVISOR_RUN_ID) is in the database
  under its own project, so no run id is reused and no run goes unrecorded,
- no scheduled fire time runs twice,
- always-running projects come back,
- `PRAGMA integrity_check` says ok.

RUNVISOR_FAULT_CYCLES sets the number of cycles (default 10) and
RUNVISOR_FAULT_SEED replays a given sequence of moments.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .fault_tools import (
    REPOSITORY,
    daemon_process,
    duplicate_fire_times,
    fault_count,
    fault_random,
    integrity,
    is_alive,
    query,
    run_processes,
    wait_until,
    write_config,
)
from .helpers import write_script

CYCLES = fault_count("RUNVISOR_FAULT_CYCLES", 10)

# Every run writes "<project> <run id>" here as its first act.
EVIDENCE = 'echo "$RUNVISOR_PROJECT $RUNVISOR_RUN_ID" >> ../evidence.log'
# Retention would delete the oldest runs, which the evidence names.
KEEP_EVERY_RUN = "history_keep = 1000000\n"


def write_projects(root: Path) -> None:
    write_script(root / "steady", f"{EVIDENCE}\nexec -a fault-steady sleep 1000")
    write_script(
        root / "flappy",
        f"""
        {EVIDENCE}
        sleep 0.$(( RANDOM % 5 ))
        exit 1
        """,
    )
    # Ignores SIGTERM, and so does its grandchild: every stop of this run
    # waits for the stop timeout and ends with SIGKILL.
    write_script(
        root / "deaf",
        f"""
        {EVIDENCE}
        trap '' TERM
        (trap '' TERM; exec -a fault-deaf-child sleep 1000) &
        exec -a fault-deaf sleep 1000
        """,
    )
    # Leaves its process group: found again only by its environment.
    write_script(
        root / "escaper",
        f"""
        {EVIDENCE}
        setsid -f bash -c 'exec -a fault-escaped sleep 1000'
        exec -a fault-escaper sleep 1000
        """,
    )
    write_script(
        root / "chatty",
        f"""
        {EVIDENCE}
        i=0
        while :; do
          for j in 1 2 3 4 5 6 7 8 9 10; do echo "line $i $j of output"; done
          i=$((i+1))
          sleep 0.01
        done
        """,
    )
    write_script(root / "tick", f"{EVIDENCE}\nsleep 0.2")


def projects_config(root: Path, *, variant: bool) -> str:
    """The projects; `variant` changes two, removes one and adds one, so a
    reload between the two stops, restarts and starts runs."""
    fast_restarts = """
    restart = "always"
    start_seconds = "0.2s"
    max_retries = 1000
    restart_limit = 1000
    backoff = { initial = "0.1s", max = "0.5s" }
    """
    text = f"""
    [projects.steady]
    trigger = "always_running"
    path = "{root / "steady"}"

    [projects.flappy]
    trigger = "always_running"
    path = "{root / "flappy"}"
    {fast_restarts}
    env = {{ VARIANT = "{"b" if variant else "a"}" }}

    [projects.deaf]
    trigger = "always_running"
    path = "{root / "deaf"}"
    stop_timeout = "0.5s"
    env = {{ VARIANT = "{"b" if variant else "a"}" }}

    [projects.escaper]
    trigger = "always_running"
    path = "{root / "escaper"}"
    stop_timeout = "0.5s"

    [projects.chatty]
    trigger = "always_running"
    path = "{root / "chatty"}"

    [projects.tick]
    trigger = "schedule"
    path = "{root / "tick"}"
    cron = "* * * * *"
    catch_up = true
    """
    extra = "steady_b" if variant else "steady_a"
    text += f"""
    [projects.{extra}]
    trigger = "always_running"
    path = "{root / "steady"}"
    """
    return text


def evidence(root: Path) -> list[tuple[str, int]]:
    try:
        lines = (root / "evidence.log").read_text().splitlines()
    except FileNotFoundError:
        return []
    pairs = []
    for line in lines:
        project, _, run_id = line.partition(" ")
        pairs.append((project, int(run_id)))
    return pairs


@pytest.mark.slow
@pytest.mark.timeout(60 + CYCLES * 15)
def test_kill9_at_random_moments_then_restart(tmp_path: Path) -> None:
    rng = fault_random("test_kill9_at_random_moments_then_restart")
    write_projects(tmp_path)
    config = write_config(
        tmp_path,
        projects_config(tmp_path, variant=False),
        settings=KEEP_EVERY_RUN,
    )
    db = tmp_path / "data" / "runvisor.db"
    variant = False
    actions: list[str] = []

    with daemon_process(tmp_path, config) as daemon:
        daemon.start()
        for cycle in range(CYCLES):
            action = rng.choice(["starts", "reload", "shutdown", "recording"])
            actions.append(action)
            if action == "starts":
                # Right after start-up: always-running runs are spawning.
                time.sleep(rng.uniform(0, 0.3))
            elif action == "reload":
                variant = not variant
                write_config(
                    tmp_path,
                    projects_config(tmp_path, variant=variant),
                    settings=KEEP_EVERY_RUN,
                )
                daemon.signal(signal.SIGHUP)
                time.sleep(rng.uniform(0, 1.5))
            elif action == "shutdown":
                # The deaf projects hold the shutdown for their stop timeout.
                daemon.signal(signal.SIGTERM)
                time.sleep(rng.uniform(0, 1.2))
            else:
                time.sleep(rng.uniform(0.3, 1.5))
            daemon.kill9()

            # What the dead daemon left behind.
            left = run_processes(daemon.tag)
            going = {
                run_id
                for (run_id,) in query(
                    db, "SELECT id FROM runs WHERE status = 'running'"
                )
            }
            assert integrity(db) == "ok", f"cycle {cycle} ({action})"

            daemon.start()

            statuses = dict(query(db, "SELECT id, status FROM runs"))
            survivors = [
                (process, statuses.get(process.run_id))
                for process in left
                if is_alive(process.pid)
            ]
            assert survivors == [], f"cycle {cycle} ({action}): orphans survived"
            not_lost = {
                run_id: statuses[run_id]
                for run_id in going
                if statuses[run_id] != "lost"
            }
            assert not_lost == {}, f"cycle {cycle} ({action})"

            # The always-running projects come back.
            for name in ("steady", "escaper", "chatty"):
                wait_until(
                    lambda name=name: [
                        pid
                        for (pid,) in query(
                            db,
                            "SELECT pid FROM runs WHERE project = ?"
                            " AND status = 'running' AND pid IS NOT NULL",
                            [name],
                        )
                        if is_alive(pid)
                    ],
                    timeout=10,
                )

        assert daemon.stop() == 0
        print(f"{CYCLES} cycles: {dict(Counter(actions))}")
        assert run_processes(daemon.tag) == []

    assert integrity(db) == "ok"
    assert query(db, "SELECT id, project FROM runs WHERE status = 'running'") == []
    assert duplicate_fire_times(db) == []
    recorded = set(query(db, "SELECT project, id FROM runs"))
    unrecorded = [pair for pair in evidence(tmp_path) if pair not in recorded]
    assert unrecorded == []
    lost = query(db, "SELECT count(*) FROM runs WHERE status = 'lost'")[0][0]
    print(f"runs: {len(recorded)}, lost: {lost}")


SCHEDULE_CYCLES = fault_count("RUNVISOR_FAULT_SCHEDULE_CYCLES", 8)
# Simulated seconds per real second in the schedule test: `* * * * *` fires
# every half second of real time.
RATE = 120.0


@pytest.mark.slow
@pytest.mark.timeout(60 + SCHEDULE_CYCLES * 15)
def test_kill9_never_runs_a_fire_time_twice(tmp_path: Path) -> None:
    rng = fault_random("test_kill9_never_runs_a_fire_time_twice")
    write_script(tmp_path / "tick", f"{EVIDENCE}\nsleep 0.05")
    # Lasts a few fire times, so most of its fires are skipped or queued.
    write_script(tmp_path / "long", f"{EVIDENCE}\nexec -a fault-long sleep 1.5")
    config = write_config(
        tmp_path,
        f"""
        [projects.tick]
        trigger = "schedule"
        path = "{tmp_path / "tick"}"
        cron = "* * * * *"
        catch_up = true

        [projects.long]
        trigger = "schedule"
        path = "{tmp_path / "long"}"
        cron = "* * * * *"
        catch_up = true

        [projects.queued]
        trigger = "schedule"
        path = "{tmp_path / "long"}"
        cron = "*/2 * * * *"
        overlap = "queue"
        catch_up = true
        """,
        settings=KEEP_EVERY_RUN,
    )
    db = tmp_path / "data" / "runvisor.db"
    origin = time.time()
    argv = [
        sys.executable,
        "-m",
        "tests.fault_clock_daemon",
        str(config),
        str(RATE),
        str(origin),
        str(origin),
    ]
    with daemon_process(
        tmp_path, config, argv=argv, extra_env={"PYTHONPATH": str(REPOSITORY)}
    ) as daemon:
        for _ in range(SCHEDULE_CYCLES):
            daemon.start()
            time.sleep(rng.uniform(0.2, 2.0))
            daemon.kill9()
            assert integrity(db) == "ok"
            assert duplicate_fire_times(db) == []
        daemon.start()
        time.sleep(1.0)
        assert daemon.stop() == 0
        assert run_processes(daemon.tag) == []

    assert duplicate_fire_times(db) == []
    assert query(db, "SELECT id FROM runs WHERE status = 'running'") == []
    recorded = set(query(db, "SELECT project, id FROM runs"))
    unrecorded = [pair for pair in evidence(tmp_path) if pair not in recorded]
    assert unrecorded == []
    fires = query(
        db,
        "SELECT count(*) FROM runs WHERE fire_time IS NOT NULL AND status != 'skipped'",
    )[0][0]
    print(f"{SCHEDULE_CYCLES} cycles, {fires} fire times run once each")
    assert fires > SCHEDULE_CYCLES


@pytest.mark.slow
def test_restart_spares_runs_of_another_daemon(tmp_path: Path) -> None:
    # Two daemons with their own data dirs and the same project name: their
    # first runs have the same name and id, and only the data dir in the
    # environment distinguishes them.
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        write_script(root / "same", "exec -a fault-same sleep 1000")
    configs = [
        write_config(
            root,
            f"""
            [projects.same]
            trigger = "always_running"
            path = "{root / "same"}"
            """,
        )
        for root in roots
    ]
    with (
        daemon_process(roots[0], configs[0]) as crashing,
        daemon_process(roots[1], configs[1]) as other,
    ):
        crashing.start()
        other.start()
        others = wait_until(lambda: run_processes(other.tag))
        wait_until(lambda: run_processes(crashing.tag))
        crashing.kill9()
        crashing.start()
        assert [process.pid for process in others if is_alive(process.pid)] == [
            process.pid for process in others
        ]
        assert crashing.stop() == 0
        assert other.stop() == 0


def test_second_daemon_on_one_data_dir_is_rejected(tmp_path: Path) -> None:
    # Two configs with their own sockets and one data dir: the second
    # daemon would reuse run ids and end the first one's runs as lost.
    write_script(tmp_path / "same", "exec -a fault-same sleep 1000")
    projects = f"""
    [projects.same]
    trigger = "always_running"
    path = "{tmp_path / "same"}"
    """
    first_root, second_root = tmp_path / "one", tmp_path / "two"
    first_root.mkdir()
    second_root.mkdir()
    data = tmp_path / "data"
    first = write_config(first_root, projects, data_dir=data)
    second = write_config(second_root, projects, data_dir=data)
    with daemon_process(first_root, first) as daemon:
        daemon.start()
        running = wait_until(lambda: run_processes(daemon.tag))
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "--config", str(second), "serve"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert [process.pid for process in running if is_alive(process.pid)] == [
            process.pid for process in running
        ]
        assert daemon.stop() == 0
    assert result.returncode == 1
    assert f"pid {daemon.pid}" in result.stderr
    assert str(data) in result.stderr
    assert "Traceback" not in result.stderr
