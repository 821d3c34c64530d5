"""Project lifecycles in each trigger mode, through a real daemon.

Children are real processes; durations run on trio's MockClock (see the
`fast_clock` fixture) and the wall clock follows it.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from supervisor.database import Database
from supervisor.logs import read_run_log
from supervisor.model import ProjectState, RunRecord, RunStatus, RunTrigger, Stream
from supervisor.spawn import DATA_DIR_VARIABLE, find_processes

from .daemon_harness import WALL_BASE, Harness, running_daemon
from .helpers import marked_pids, write_script


def project_folder(tmp_path: Path, name: str, body: str) -> Path:
    folder = tmp_path / name
    write_script(folder, body)
    return folder


async def test_manual_run_records_output_and_success(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(
        tmp_path,
        "hello",
        """
        printf 'ab'; sleep 0.1; printf 'cd\\n'
        printf 'out-'; echo 'err-line' >&2; sleep 0.05; echo 'rest'
        echo "project=$RUNVISOR_PROJECT trigger=$RUNVISOR_TRIGGER"
        printf 'no-newline-at-end'
        """,
    )
    config = f"""
    [projects.hello]
    path = "{tmp_path / "hello"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        result = daemon.manager.trigger("hello")
        assert result.run_id is not None
        (run,) = await daemon.wait_runs("hello", 1)
        lines = daemon.log_lines("hello", run.id)
        assert daemon.state("hello") == ProjectState.EXITED
    assert run.status == RunStatus.SUCCEEDED
    assert run.exit_code == 0
    assert run.trigger == RunTrigger.MANUAL
    assert run.pid is not None
    assert [text for stream, text in lines if stream == "out"] == [
        "abcd",
        "out-rest",
        "project=hello trigger=manual",
        "no-newline-at-end",
    ]
    assert [text for stream, text in lines if stream == "err"] == ["err-line"]


async def test_invalid_bytes_do_not_break_capture(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(
        tmp_path,
        "noise",
        """
        echo before
        printf '\\xff\\xfe\\x88 raw\\n'
        printf 'caf\\xc3'; sleep 0.1; printf '\\xa9\\n'
        head -c 65536 /dev/urandom; echo
        for i in 1 2 3 4 5; do echo "after $i"; done
        echo done
        """,
    )
    config = f"""
    [projects.noise]
    path = "{tmp_path / "noise"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("noise")
        (run,) = await daemon.wait_runs("noise", 1)
        texts = [text for _, text in daemon.log_lines("noise", run.id)]
    assert run.exit_code == 0
    assert texts[0] == "before"
    assert texts[1] == "\ufffd\ufffd\ufffd raw"
    assert texts[2] == "café"
    assert texts[-6:] == ["after 1", "after 2", "after 3", "after 4", "after 5", "done"]


async def test_missing_run_script_fails_the_run_not_the_daemon(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    (tmp_path / "empty").mkdir()
    project_folder(tmp_path, "fine", "echo fine")
    config = f"""
    [projects.broken]
    path = "{tmp_path / "empty"}"
    trigger = "manual"

    [projects.fine]
    path = "{tmp_path / "fine"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("broken")
        (broken,) = await daemon.wait_runs("broken", 1)
        daemon.manager.trigger("fine")
        (fine,) = await daemon.wait_runs("fine", 1)
        broken_log = daemon.log_lines("broken", broken.id)
    assert broken.status == RunStatus.FAILED
    assert "'./run.sh' does not exist" in broken.reason
    assert broken_log == [("err", f"runvisor: {broken.reason}")]
    assert fine.status == RunStatus.SUCCEEDED


async def test_missing_interpreter_is_the_run_reason(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    for name, first_line in (
        ("absolute", "#!/nonexistent/interp"),
        ("env", "#!/usr/bin/env nosuchprog"),
    ):
        script = tmp_path / name / "run.sh"
        script.parent.mkdir()
        script.write_text(f"{first_line}\necho never\n")
        script.chmod(0o755)
    config = f"""
    [projects.absolute]
    path = "{tmp_path / "absolute"}"
    trigger = "manual"

    [projects.env]
    path = "{tmp_path / "env"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("absolute")
        (absolute,) = await daemon.wait_runs("absolute", 1)
        daemon.manager.trigger("env")
        (env,) = await daemon.wait_runs("env", 1)
        env_log = daemon.log_lines("env", env.id)

    assert absolute.status == RunStatus.FAILED
    assert absolute.reason == (
        "Cannot start './run.sh': the interpreter '/nonexistent/interp' named on "
        "its first line was not found. Install it or fix the '#!' line."
    )
    # env itself starts, and reports the missing program in the run's stderr.
    assert env.status == RunStatus.FAILED
    assert env.exit_code == 127
    assert env.reason == "exit code 127"
    assert len(env_log) == 1
    assert env_log[0][0] == "err"
    assert "nosuchprog" in env_log[0][1]
    assert "No such file or directory" in env_log[0][1]


async def test_dropped_log_lines_are_noted_in_history(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(tmp_path, "quiet", "echo one; echo two >&2; echo three")
    project_folder(tmp_path, "failing", "echo gone; exit 3")
    # A file where the log folder belongs makes every log write fail.
    logs = tmp_path / "data" / "logs"
    logs.mkdir(parents=True)
    (logs / "quiet").write_text("")
    (logs / "failing").write_text("")
    config = f"""
    [projects.quiet]
    path = "{tmp_path / "quiet"}"
    trigger = "manual"

    [projects.failing]
    path = "{tmp_path / "failing"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("quiet")
        (quiet,) = await daemon.wait_runs("quiet", 1)
        daemon.manager.trigger("failing")
        (failing,) = await daemon.wait_runs("failing", 1)

    assert quiet.status == RunStatus.SUCCEEDED
    assert quiet.reason == "exit code 0; 3 log lines dropped: Not a directory"
    assert failing.status == RunStatus.FAILED
    assert failing.reason == "exit code 3; 1 log line dropped: Not a directory"


async def test_manual_overlap_skip_records_skipped_run(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(tmp_path, "slow", "while [ ! -f release ]; do sleep 0.02; done")
    config = f"""
    [projects.slow]
    path = "{tmp_path / "slow"}"
    trigger = "manual"
    """
    async with running_daemon(tmp_path, config) as daemon:
        first = daemon.manager.trigger("slow")
        second = daemon.manager.trigger("slow")
        (tmp_path / "slow" / "release").touch()
        runs = await daemon.wait_runs("slow", 2)
    assert first.outcome == "started"
    assert second.outcome == "skipped"
    assert [run.status for run in runs] == [RunStatus.SUCCEEDED, RunStatus.SKIPPED]
    assert f"run {first.run_id} still running" in runs[1].reason


async def test_manual_overlap_queue_keeps_one_waiting(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(
        tmp_path,
        "queued",
        """
        echo "start $RUNVISOR_RUN_ID" >> starts.log
        while [ ! -f release ]; do sleep 0.02; done
        """,
    )
    config = f"""
    [projects.queued]
    path = "{tmp_path / "queued"}"
    trigger = "manual"
    overlap = "queue"
    """
    async with running_daemon(tmp_path, config) as daemon:
        outcomes = [daemon.manager.trigger("queued").outcome for _ in range(3)]
        (tmp_path / "queued" / "release").touch()
        runs = await daemon.wait_runs("queued", 3)
    assert outcomes == ["started", "queued", "skipped"]
    statuses = sorted(run.status for run in runs)
    assert statuses == sorted(
        [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED, RunStatus.SKIPPED]
    )
    assert len((tmp_path / "queued" / "starts.log").read_text().splitlines()) == 2


async def test_manual_overlap_replace_stops_the_old_run(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(tmp_path, "replaced", "exec -a t10-replaced sleep 1000")
    config = f"""
    [projects.replaced]
    path = "{tmp_path / "replaced"}"
    trigger = "manual"
    overlap = "replace"
    stop_timeout = "2s"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("replaced")
        await daemon.wait_for(lambda: len(marked_pids("t10-")) == 1)
        old_pid = marked_pids("t10-")[0]
        assert daemon.manager.trigger("replaced").outcome == "replacing"
        await daemon.wait_for(lambda: marked_pids("t10-") not in ([], [old_pid]))
        runs = await daemon.wait_runs("replaced", 1)
        await daemon.manager.stop("replaced")
    assert runs[0].status == RunStatus.STOPPED
    assert "replaced by a newer run" in runs[0].reason


async def test_timeout_stops_run_as_timed_out(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(tmp_path, "hang", "exec -a t11-hang sleep 1000")
    config = f"""
    [projects.hang]
    path = "{tmp_path / "hang"}"
    trigger = "manual"
    timeout = "5m"
    stop_timeout = "1s"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("hang")
        (run,) = await daemon.wait_runs("hang", 1)
    assert run.status == RunStatus.TIMED_OUT
    assert run.reason == "timed out after 5m"
    assert run.signal == signal.SIGTERM
    duration = (run.ended_at - run.started_at).total_seconds()
    assert 300 <= duration < 302
    assert marked_pids("t11-") == []


async def test_fast_failures_hit_the_restart_limit(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "flap",
        """
        echo "start" >> starts.log
        echo boom >&2
        exit 3
        """,
    )
    config = f"""
    [projects.flap]
    path = "{folder}"
    trigger = "always_running"
    restart = "on-failure"
    start_seconds = 0
    restart_limit = 3
    restart_window = "60s"
    backoff = {{ initial = "200ms", factor = 2 }}
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_state("flap", ProjectState.FATAL)
        runs = await daemon.wait_runs("flap", 4)
        reason = daemon.manager.runner("flap").reason
    assert len(runs) == 4
    assert [run.exit_code for run in runs] == [3, 3, 3, 3]
    assert [run.trigger for run in runs] == [RunTrigger.STARTUP] + [
        RunTrigger.RESTART
    ] * 3
    assert "restart_limit = 3" in reason
    assert len((folder / "starts.log").read_text().splitlines()) == 4


async def test_clean_exit_is_not_restarted_on_failure(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(tmp_path, "once", "echo start >> starts.log; exit 0")
    config = f"""
    [projects.once]
    path = "{folder}"
    trigger = "always_running"
    restart = "on-failure"
    start_seconds = 0
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_state("once", ProjectState.EXITED)
        (run,) = await daemon.wait_runs("once", 1)
    assert run.status == RunStatus.SUCCEEDED
    assert len((folder / "starts.log").read_text().splitlines()) == 1


@pytest.mark.parametrize(("code", "level"), [(0, "INFO"), (3, "WARNING")])
async def test_run_end_is_logged_by_outcome(
    tmp_path: Path,
    fast_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    code: int,
    level: str,
) -> None:
    folder = project_folder(tmp_path, "job", f"exit {code}")
    config = f"""
    [projects.job]
    path = "{folder}"
    trigger = "manual"
    """
    caplog.set_level(logging.INFO, logger="supervisor.runner")
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("job")
        await daemon.wait_runs("job", 1)
    (ended,) = [r for r in caplog.records if r.getMessage().startswith("exited:")]
    assert ended.levelname == level
    assert f"exit_code={code}" in ended.getMessage()


async def test_backoff_gaps_grow_and_reset_after_stable_run(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "backoff",
        """
        n=$(( $(cat n 2>/dev/null || echo 0) + 1 )); echo "$n" > n
        if [ "$n" -eq 4 ]; then
          while [ ! -f release ]; do sleep 0.02; done
        fi
        exit 1
        """,
    )
    config = f"""
    [projects.backoff]
    path = "{folder}"
    trigger = "always_running"
    restart = "always"
    start_seconds = "500ms"
    max_retries = 20
    restart_limit = 20
    backoff = {{ initial = "1s", factor = 2, max = "8s", reset_after = "10s" }}
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_for(
            lambda: (
                (folder / "n").exists() and (folder / "n").read_text().strip() == "4"
            )
        )
        # Let run 4 stay up for more than reset_after of simulated time.
        start = fast_clock.current_time()
        await daemon.wait_for(lambda: fast_clock.current_time() - start > 15)
        (folder / "release").touch()
        runs = await daemon.wait_runs("backoff", 9)
        await daemon.manager.stop("backoff")
    runs = runs[:9]
    gaps = [
        round((later.started_at - earlier.ended_at).total_seconds())
        for earlier, later in itertools.pairwise(runs)
    ]
    assert gaps == [1, 2, 4, 1, 2, 4, 8, 8]


async def test_user_stop_is_not_a_failure_and_not_restarted(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "graceful",
        """
        echo "start $$" >> starts.log
        trap 'sleep 0.05; exit 1' TERM
        while :; do sleep 0.05; done
        """,
    )
    config = f"""
    [projects.graceful]
    path = "{folder}"
    trigger = "always_running"
    restart = "on-failure"
    backoff = {{ initial = "500ms" }}
    stop_timeout = "5s"
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_state("graceful", ProjectState.RUNNING)
        restarts_before = daemon.manager.runner("graceful").tracker.restarts
        await daemon.manager.stop("graceful")
        start = fast_clock.current_time()
        await daemon.wait_for(lambda: fast_clock.current_time() - start > 10)
        (run,) = await daemon.wait_runs("graceful", 1)
        assert daemon.state("graceful") == ProjectState.STOPPED
        assert daemon.manager.runner("graceful").tracker.restarts == restarts_before
    assert len((folder / "starts.log").read_text().splitlines()) == 1
    assert run.status == RunStatus.STOPPED
    assert run.reason == "stopped by user"
    assert run.exit_code == 1


async def test_stop_during_backoff_cancels_the_restart(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "killed",
        """
        echo "start $$" >> starts.log
        exec -a t12-victim sleep 1000
        """,
    )
    config = f"""
    [projects.killed]
    path = "{folder}"
    trigger = "always_running"
    restart = "on-failure"
    backoff = {{ initial = "3s" }}
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_state("killed", ProjectState.RUNNING)
        (pid,) = marked_pids("t12-")
        import os

        os.kill(pid, signal.SIGKILL)
        await daemon.wait_state("killed", ProjectState.BACKOFF)
        await daemon.manager.stop("killed")
        start = fast_clock.current_time()
        await daemon.wait_for(lambda: fast_clock.current_time() - start > 10)
        assert daemon.state("killed") == ProjectState.STOPPED
    assert len((folder / "starts.log").read_text().splitlines()) == 1


async def test_deaf_process_is_killed_after_stop_timeout(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    project_folder(
        tmp_path,
        "deaf",
        """
        trap '' TERM INT HUP
        exec -a t13-deaf bash -c 'trap "" TERM; while :; do echo tick; sleep 1; done'
        """,
    )
    config = f"""
    [projects.deaf]
    path = "{tmp_path / "deaf"}"
    trigger = "manual"
    stop_timeout = "3s"
    """
    async with running_daemon(tmp_path, config) as daemon:
        daemon.manager.trigger("deaf")
        await daemon.wait_for(lambda: bool(marked_pids("t13-")))
        stopping_seen: list[bool] = []

        async def watch() -> None:
            await daemon.wait_state("deaf", ProjectState.STOPPING)
            stopping_seen.append(bool(marked_pids("t13-")))

        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await daemon.manager.stop("deaf")
        (run,) = await daemon.wait_runs("deaf", 1)
    assert stopping_seen == [True]
    assert marked_pids("t13-") == []
    assert run.status == RunStatus.STOPPED
    assert run.signal == signal.SIGKILL
    assert "killed with SIGKILL after stop_timeout = 3s" in run.reason
    duration = (run.ended_at - run.started_at).total_seconds()
    assert duration >= 3


async def test_shutdown_ends_every_group(tmp_path: Path, fast_clock: MockClock) -> None:
    project_folder(
        tmp_path,
        "tree",
        """
        (exec -a t14-bg sleep 1000) &
        (exec -a t14-pipe-a sleep 1000) | (exec -a t14-pipe-b cat) &
        wait
        """,
    )
    config = f"""
    [projects.tree]
    path = "{tmp_path / "tree"}"
    trigger = "always_running"
    stop_timeout = "3s"
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_for(lambda: len(marked_pids("t14-")) == 3)
    assert marked_pids("t14-") == []
    database = Database.open(tmp_path / "data" / "runvisor.db")
    (run,) = database.history("tree")
    database.close()
    assert run.status == RunStatus.STOPPED
    assert run.reason == "the daemon is shutting down"
    assert run.signal == signal.SIGTERM


async def test_shutdown_signals_each_run_once(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    # The shutdown signals every group before it cancels the runs. The stop
    # that follows must not send a second SIGTERM, because many programs
    # read that as "quit at once".
    names = [f"trap{i}" for i in range(5)]
    config = ""
    for name in names:
        project_folder(
            tmp_path,
            name,
            """
            trap 'echo term >> terms.log' TERM
            echo ready > ready
            while true; do sleep 0.05; done
            """,
        )
        config += f"""
        [projects.{name}]
        path = "{tmp_path / name}"
        trigger = "always_running"
        stop_timeout = "1s"
        """

    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_for(
            lambda: all((tmp_path / name / "ready").exists() for name in names)
        )

    database = Database.open(tmp_path / "data" / "runvisor.db")
    runs = [database.history(name)[0] for name in names]
    database.close()

    for name in names:
        assert (tmp_path / name / "terms.log").read_text() == "term\n", name
    assert [run.status for run in runs] == [RunStatus.STOPPED] * len(names)
    assert [run.signal for run in runs] == [signal.SIGKILL] * len(names)


async def test_shutdown_keeps_stopping_output(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    # A shutdown cancels the runs, but what a run prints in its SIGTERM
    # handler must still reach its log, as it does for a person's stop.
    folder = project_folder(
        tmp_path,
        "polite",
        """
        trap 'echo "goodbye from $RUNVISOR_RUN_ID"; exit 0' TERM
        echo ready > ready
        while true; do sleep 0.05; done
        """,
    )
    config = f"""
    [projects.polite]
    path = "{folder}"
    trigger = "always_running"
    """
    async with running_daemon(tmp_path, config) as daemon:
        await daemon.wait_for(lambda: (folder / "ready").exists())
    records = read_run_log(tmp_path / "data" / "logs" / "polite" / "1.log")
    # bash also reports the killed `sleep` ("Terminated") on stderr.
    assert (Stream.OUT, "goodbye from 1") in [(r.stream, r.text) for r in records]


async def test_schedule_skips_fires_while_a_run_is_going(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "cron",
        """
        echo "start $RUNVISOR_RUN_ID" >> starts.log
        if [ ! -f first-done ]; then
          while [ ! -f release ]; do sleep 0.02; done
          touch first-done
        fi
        """,
    )
    config = f"""
    [projects.cron]
    path = "{folder}"
    trigger = "schedule"
    cron = "* * * * *"
    timezone = "UTC"
    """
    async with running_daemon(tmp_path, config) as daemon:
        runs = await daemon.wait_runs("cron", 3)
        (folder / "release").touch()
        runs = await daemon.wait_runs("cron", 5)
        await daemon.manager.stop("cron")
        runs = await daemon.history("cron")
    runs.sort(key=lambda run: run.id)
    first = runs[0]
    assert first.fire_time == WALL_BASE + timedelta(minutes=1)
    skipped = [run for run in runs if run.status == RunStatus.SKIPPED]
    assert len(skipped) >= 2
    assert all(f"run {first.id} still running" in run.reason for run in skipped)
    started = [run for run in runs if run.status != RunStatus.SKIPPED]
    for run in started:
        assert run.fire_time is not None
        assert run.fire_time.second == 0
        lateness = (run.started_at - run.fire_time).total_seconds()
        assert 0 <= lateness < 2
    # Never two at once: the second started run began after the first ended.
    assert started[1].started_at >= first.ended_at


async def test_catch_up_runs_once_for_fires_missed_while_down(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(tmp_path, "nightly", "echo ran")
    config = f"""
    [projects.nightly]
    path = "{folder}"
    trigger = "schedule"
    cron = "0 3 * * *"
    timezone = "UTC"
    catch_up = true
    """
    first_base = WALL_BASE.replace(hour=2, minute=59)
    async with running_daemon(tmp_path, config, wall_base=first_base) as daemon:
        (run,) = await daemon.wait_runs("nightly", 1)
    assert run.trigger == RunTrigger.SCHEDULE
    assert run.fire_time == WALL_BASE.replace(hour=3, minute=0)

    # Down for three days: three fire times missed, one catch-up run.
    later = first_base + timedelta(days=3, hours=2)
    async with running_daemon(tmp_path, config, wall_base=later) as daemon:
        runs = await daemon.wait_runs("nightly", 2)
        assert daemon.manager.runner("nightly").next_fire == later.replace(
            hour=3, minute=0
        ) + timedelta(days=1)
    assert len(runs) == 2
    assert runs[1].trigger == RunTrigger.CATCH_UP
    assert runs[1].fire_time == (first_base + timedelta(days=3)).replace(
        hour=3, minute=0
    )


async def test_history_keeps_the_newest_runs_and_their_logs(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = project_folder(tmp_path, "chatty", 'echo "run $RUNVISOR_RUN_ID"')
    config = f"""
    [projects.chatty]
    path = "{folder}"
    trigger = "manual"
    """
    async with running_daemon(
        tmp_path,
        config.replace("[projects.chatty]", "history_keep = 3\n\n[projects.chatty]"),
    ) as daemon:
        for _ in range(5):
            run_id = daemon.manager.trigger("chatty").run_id
            await daemon.wait_for(
                lambda run_id=run_id: (
                    daemon.manager.runner("chatty").last_run is not None
                    and daemon.manager.runner("chatty").last_run.id == run_id
                )
            )
        logs_dir = tmp_path / "data" / "logs" / "chatty"
        # Pruning follows the run's final row; wait for the last one.
        await daemon.wait_for(lambda: len(list(logs_dir.iterdir())) == 3)
        runs = await daemon.history("chatty")
        kept_logs = sorted(path.name for path in logs_dir.iterdir())
    assert [run.id for run in runs] == [5, 4, 3]
    assert kept_logs == ["3.log", "4.log", "5.log"]


# -- scheduled runs started ahead of their fire time ------------------------


@pytest.fixture
def stepped_clock() -> MockClock:
    """Simulated time that moves only when the test jumps it."""
    return MockClock()


async def held_pids(tmp_path: Path, project: str, count: int) -> list[int]:
    """Wait in real time until `count` processes of `project` are alive."""
    markers = {DATA_DIR_VARIABLE: str(tmp_path / "data"), "RUNVISOR_PROJECT": project}
    deadline = time.monotonic() + 10
    while True:
        pids = find_processes(markers)
        if len(pids) == count:
            return pids
        if time.monotonic() > deadline:
            raise AssertionError(f"{project}: {len(pids)} processes, not {count}")
        await trio.to_thread.run_sync(time.sleep, 0.02)


async def finished_runs(daemon: Harness, name: str, count: int) -> list[RunRecord]:
    """Wait in real time until `name` has `count` finished runs; with a
    stepped clock, `wait_runs` could miss the event it waits for."""
    deadline = time.monotonic() + 10
    while True:
        runs = await daemon.history(name)
        done = [run for run in runs if run.status != RunStatus.RUNNING]
        if len(done) >= count:
            return sorted(runs, key=lambda run: run.id)
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: fewer than {count} finished runs: {runs}")
        await trio.to_thread.run_sync(time.sleep, 0.02)


def cron_config(folder: Path, extra: str = "") -> str:
    return f"""
    [projects.cron]
    path = "{folder}"
    trigger = "schedule"
    cron = "* * * * *"
    timezone = "UTC"
    prestart = "5s"
    {extra}
    """


async def test_held_run_released_at_fire_time(
    tmp_path: Path, stepped_clock: MockClock
) -> None:
    folder = project_folder(
        tmp_path,
        "cron",
        """
        source .env.local
        echo "run $RUNVISOR_RUN_ID trigger $RUNVISOR_TRIGGER token $TOKEN" >> ran.log
        echo "hello from the run"
        """,
    )
    config = cron_config(folder, 'env = { TOKEN = "t-1" }')
    async with running_daemon(tmp_path, config) as daemon:
        # Fire time 12:01:00, prestart 5 s: held from 12:00:55.
        stepped_clock.jump(56)
        (pid,) = await held_pids(tmp_path, "cron", 1)
        await trio.to_thread.run_sync(time.sleep, 0.3)
        assert not (folder / "ran.log").exists()
        assert (folder / ".env.local").exists()
        assert daemon.state("cron") == ProjectState.SCHEDULED
        assert daemon.pid("cron") is None

        stepped_clock.jump(4)
        (run,) = await finished_runs(daemon, "cron", 1)
        lines = daemon.log_lines("cron", run.id)
    assert run.pid == pid
    assert run.status == RunStatus.SUCCEEDED
    assert run.trigger == RunTrigger.SCHEDULE
    assert run.fire_time == WALL_BASE + timedelta(minutes=1)
    assert run.started_at == run.fire_time
    assert (
        folder / "ran.log"
    ).read_text() == f"run {run.id} trigger schedule token t-1\n"
    assert lines == [("out", "hello from the run")]
    assert not (folder / ".env.local").exists()


async def test_stopping_a_schedule_ends_its_held_run(
    tmp_path: Path, stepped_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.runner")
    folder = project_folder(tmp_path, "cron", "touch ran")
    async with running_daemon(tmp_path, cron_config(folder)) as daemon:
        stepped_clock.jump(56)
        await held_pids(tmp_path, "cron", 1)
        await daemon.manager.stop("cron")
        # The skipped run id is explained in the log.
        assert (
            "held run discarded: project=cron run=1 the project was stopped; "
            "the run id is skipped"
        ) in caplog.messages
        await held_pids(tmp_path, "cron", 0)
        stepped_clock.jump(60)
        assert await daemon.history("cron") == []
    assert not (folder / "ran").exists()
    assert not (folder / ".env.local").exists()
    # No log is left for the run that never started.
    assert list((tmp_path / "data" / "logs" / "cron").iterdir()) == []


async def test_shutdown_ends_a_held_run(
    tmp_path: Path, stepped_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.runner")
    folder = project_folder(tmp_path, "cron", "touch ran")
    async with running_daemon(tmp_path, cron_config(folder)):
        stepped_clock.jump(56)
        await held_pids(tmp_path, "cron", 1)
    await held_pids(tmp_path, "cron", 0)
    assert not (folder / "ran").exists()
    assert (
        "held run discarded: project=cron run=1 the daemon is shutting down; "
        "the run id is skipped"
    ) in caplog.messages


async def test_run_started_by_hand_meanwhile_replaces_the_held_run(
    tmp_path: Path, stepped_clock: MockClock
) -> None:
    # The hand-started run removes `.env.local` when it ends, so the held
    # run, whose file that was, must not be used.
    folder = project_folder(
        tmp_path, "cron", 'source .env.local; echo "$RUNVISOR_TRIGGER" >> ran.log'
    )
    config = cron_config(folder, 'env = { TOKEN = "t-1" }')
    async with running_daemon(tmp_path, config) as daemon:
        stepped_clock.jump(56)
        (held,) = await held_pids(tmp_path, "cron", 1)
        daemon.manager.trigger("cron")
        await finished_runs(daemon, "cron", 1)
        stepped_clock.jump(4)
        runs = await finished_runs(daemon, "cron", 2)
    assert [run.status for run in runs] == [RunStatus.SUCCEEDED] * 2
    assert [run.trigger for run in runs] == [RunTrigger.MANUAL, RunTrigger.SCHEDULE]
    assert runs[1].pid != held
    assert (folder / "ran.log").read_text() == "manual\nschedule\n"


async def test_prestart_zero_starts_the_run_at_its_fire_time(
    tmp_path: Path, stepped_clock: MockClock
) -> None:
    folder = project_folder(tmp_path, "cron", "touch ran")
    config = cron_config(folder).replace('prestart = "5s"', "prestart = 0")
    async with running_daemon(tmp_path, config) as daemon:
        stepped_clock.jump(59)
        await trio.to_thread.run_sync(time.sleep, 0.3)
        await held_pids(tmp_path, "cron", 0)
        stepped_clock.jump(1)
        (run,) = await finished_runs(daemon, "cron", 1)
    assert run.status == RunStatus.SUCCEEDED
    assert (folder / "ran").exists()


async def test_no_run_is_held_for_a_fire_time_already_handled(
    tmp_path: Path, stepped_clock: MockClock
) -> None:
    # A hold that is ready only after its fire (a slow credential lookup)
    # must not leave a bash waiting for a fire that has passed.
    folder = project_folder(tmp_path, "cron", "touch ran")
    async with running_daemon(tmp_path, cron_config(folder)) as daemon:
        stepped_clock.jump(60)
        (run,) = await finished_runs(daemon, "cron", 1)
        assert run.fire_time is not None
        daemon.manager.runner("cron").prepare(run.fire_time)
        await trio.to_thread.run_sync(time.sleep, 0.3)
        await held_pids(tmp_path, "cron", 0)


async def test_script_rewritten_while_held_runs_as_new(
    tmp_path: Path, stepped_clock: MockClock
) -> None:
    # Bash has the old script open and has read its '#!' line: rewritten in
    # place, the new text would run under the old interpreter.
    folder = project_folder(tmp_path, "cron", "echo old > ran")
    async with running_daemon(tmp_path, cron_config(folder)) as daemon:
        stepped_clock.jump(56)
        (held,) = await held_pids(tmp_path, "cron", 1)
        # write_text truncates and writes the same file, as `cat >` does.
        (folder / "run.sh").write_text("#!/bin/sh\necho new > ran\n")
        stepped_clock.jump(4)
        (run,) = await finished_runs(daemon, "cron", 1)
    assert run.status == RunStatus.SUCCEEDED
    assert run.pid != held
    assert (folder / "ran").read_text() == "new\n"
