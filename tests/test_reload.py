"""Reload: a valid file is applied as a diff, an invalid one changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from trio.testing import MockClock

from supervisor.model import ProjectState, RunStatus

from .daemon_harness import running_daemon
from .helpers import marked_pids, write_script


def three_projects(tmp_path: Path, *, order: str = "abc", c_value: str = "one") -> str:
    tables = {
        "a": f"""
[projects.a]
path = "{tmp_path / "a"}"
trigger = "always_running"
""",
        "b": f"""
[projects.b]
path = "{tmp_path / "b"}"
trigger = "schedule"
cron = "*/5 * * * *"
timezone = "UTC"
""",
        "c": f"""
[projects.c]
path = "{tmp_path / "c"}"
trigger = "manual"

[projects.c.env]
GREETING = {{ value = "{c_value}-literal" }}
""",
    }
    return "".join(tables[name] for name in order)


def make_folders(tmp_path: Path) -> None:
    write_script(tmp_path / "a", "exec -a t20-a sleep 100000")
    write_script(tmp_path / "b", "echo b")
    write_script(tmp_path / "c", 'echo "greeting=$GREETING"')
    write_script(tmp_path / "d", "echo d")


async def test_reload_touches_only_what_changed(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    make_folders(tmp_path)
    text = three_projects(tmp_path)
    async with running_daemon(tmp_path, text) as daemon:
        await daemon.wait_state("a", ProjectState.RUNNING)
        pid = daemon.pid("a")
        next_fire = daemon.manager.runner("b").next_fire
        runs_before = await daemon.history()

        # (1) the byte-identical file
        outcome = await daemon.daemon.reload()
        assert outcome.ok
        assert outcome.diff is not None
        assert sorted(outcome.diff.unchanged) == ["a", "b", "c"]

        # (2) the same projects in another order, rewritten (new mtime)
        daemon.write_config(three_projects(tmp_path, order="cab"))
        outcome = await daemon.daemon.reload()
        assert outcome.diff is not None
        assert outcome.diff.changed == ()

        # (3) plus a new project
        daemon.write_config(
            three_projects(tmp_path, order="cab")
            + f'\n[projects.d]\npath = "{tmp_path / "d"}"\ntrigger = "manual"\n'
        )
        outcome = await daemon.daemon.reload()
        assert outcome.diff is not None
        assert outcome.diff.added == ("d",)

        # (4) only c's secret literal changed
        daemon.write_config(
            three_projects(tmp_path, order="cab", c_value="two")
            + f'\n[projects.d]\npath = "{tmp_path / "d"}"\ntrigger = "manual"\n'
        )
        outcome = await daemon.daemon.reload()
        assert outcome.diff is not None
        assert outcome.diff.changed == ("c",)

        assert daemon.pid("a") == pid
        assert daemon.manager.runner("b").next_fire == next_fire
        assert await daemon.history() == runs_before

        daemon.manager.trigger("c")
        (run,) = await daemon.wait_runs("c", 1)
        daemon.manager.trigger("d")
        (d_run,) = await daemon.wait_runs("d", 1)
        lines = daemon.log_lines("c", run.id)
    assert run.status == RunStatus.SUCCEEDED
    # The literal is a secret, so the run sees it and the log masks it.
    assert lines == [("out", "greeting=***")]
    assert d_run.status == RunStatus.SUCCEEDED
    assert marked_pids("t20-") == []


BROKEN_FILES = {
    "unclosed-string": '[projects.a]\npath = "a\ntrigger = "always_running"\n',
    "unknown-trigger": '[projects.a]\npath = "a"\ntrigger = "sometimes"\n',
    "duplicate-project": (
        '[projects.a]\ntrigger = "manual"\n\n[projects.a]\ntrigger = "manual"\n'
    ),
    "empty": "",
}


@pytest.mark.parametrize("broken", sorted(BROKEN_FILES))
async def test_broken_reload_keeps_the_running_config(
    tmp_path: Path, fast_clock: MockClock, broken: str
) -> None:
    make_folders(tmp_path)
    text = three_projects(tmp_path)
    async with running_daemon(tmp_path, text) as daemon:
        await daemon.wait_state("a", ProjectState.RUNNING)
        pid = daemon.pid("a")
        daemon.write_config(BROKEN_FILES[broken], header=False)

        outcome = await daemon.daemon.reload()
        assert not outcome.ok
        assert outcome.errors
        assert all(str(daemon.config_path) in error for error in outcome.errors)
        assert daemon.daemon.last_reload is outcome
        assert daemon.pid("a") == pid
        assert daemon.manager.names == ["a", "b", "c"]
        assert daemon.state("b") == ProjectState.SCHEDULED

        daemon.write_config(text)
        outcome = await daemon.daemon.reload()
        assert outcome.ok
        assert daemon.pid("a") == pid
    assert marked_pids("t20-") == []


async def test_reload_restarts_changed_and_stops_removed(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    make_folders(tmp_path)
    async with running_daemon(tmp_path, three_projects(tmp_path)) as daemon:
        await daemon.wait_state("a", ProjectState.RUNNING)
        pid = daemon.pid("a")
        changed_a = three_projects(tmp_path).replace(
            'trigger = "always_running"\n',
            'trigger = "always_running"\nstop_timeout = "2s"\n',
        )
        daemon.write_config(changed_a.replace(three_projects(tmp_path, order="c"), ""))
        outcome = await daemon.daemon.reload()
        assert outcome.diff is not None
        assert outcome.diff.changed == ("a",)
        assert outcome.diff.removed == ("c",)
        await daemon.wait_state("a", ProjectState.RUNNING)
        assert daemon.pid("a") not in (None, pid)
        assert daemon.manager.names == ["a", "b"]
        runs = await daemon.wait_runs("a", 1)
    assert runs[0].status == RunStatus.STOPPED
    assert runs[0].reason == "restarted: its config changed"


async def test_reload_keeps_a_stopped_project_stopped(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    make_folders(tmp_path)
    async with running_daemon(tmp_path, three_projects(tmp_path)) as daemon:
        await daemon.wait_state("a", ProjectState.RUNNING)
        await daemon.manager.stop("a")
        daemon.write_config(
            three_projects(tmp_path).replace(
                'trigger = "always_running"\n',
                'trigger = "always_running"\nstop_timeout = "2s"\n',
            )
        )
        outcome = await daemon.daemon.reload()
        assert outcome.diff is not None
        assert outcome.diff.changed == ("a",)
        assert daemon.state("a") == ProjectState.STOPPED
        assert marked_pids("t20-") == []
