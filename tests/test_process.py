"""Real child processes: spawning, output pumping, group stop and clean-up."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from supervisor import process, spawn
from supervisor.errors import SpawnError
from supervisor.model import Stream
from supervisor.process import open_process
from supervisor.spawn import ProcessSpec

from .helpers import marked_pids, wait_until_gone, write_script


class Collector:
    def __init__(self) -> None:
        self.lines: list[tuple[Stream, str]] = []

    def __call__(self, stream: Stream, lines: list[str], at: float) -> None:
        self.lines.extend((stream, line) for line in lines)

    def text(self, stream: Stream) -> list[str]:
        return [line for kind, line in self.lines if kind == stream]


def spec_for(folder: Path, command: str = "./run.sh") -> ProcessSpec:
    return ProcessSpec(command=command, cwd=folder, env=spawn.child_environment({}))


async def test_output_lines_keep_their_stream(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        """
        printf 'ab'; sleep 0.2; printf 'cd\\n'
        printf 'out-'; echo 'err-line' >&2; sleep 0.1; echo 'rest'
        printf 'no-newline-at-end'
        """,
    )
    output = Collector()
    async with open_process(spec_for(tmp_path), output) as child:
        status = await child.wait()
    assert status.exit_code == 0
    assert output.text(Stream.OUT) == ["abcd", "out-rest", "no-newline-at-end"]
    assert output.text(Stream.ERR) == ["err-line"]


async def test_run_gets_its_own_process_group(tmp_path: Path) -> None:
    write_script(tmp_path, "ps -o pgid= -p $$; ps -o sid= -p $$")
    output = Collector()
    async with open_process(spec_for(tmp_path), output) as child:
        await child.wait()
    pgid, sid = (int(line) for line in output.text(Stream.OUT))
    assert pgid == child.pid
    assert sid == child.pid
    assert pgid != os.getpgid(0)


async def test_stop_ends_grandchildren_and_pipelines(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        """
        (exec -a t01-bg sleep 1000) &
        (exec -a t01-pipe-a sleep 1000) | (exec -a t01-pipe-b cat) &
        wait
        """,
    )
    async with open_process(spec_for(tmp_path), Collector()) as child:
        with trio.fail_after(5):
            while len(marked_pids("t01-")) < 3:
                await trio.sleep(0.02)
        status = await child.stop(signal.SIGTERM, 3.0)
    assert status.signal == signal.SIGTERM
    assert not child.killed
    assert marked_pids("t01-") == []


async def test_stop_kills_deaf_group_after_timeout(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        """
        trap '' TERM INT HUP
        exec -a t02-deaf bash -c 'trap "" TERM; while :; do echo tick; sleep 0.05; done'
        """,
    )
    output = Collector()
    async with open_process(spec_for(tmp_path), output) as child:
        with trio.fail_after(5):
            while not output.text(Stream.OUT):
                await trio.sleep(0.02)
        began = time.monotonic()
        status = await child.stop(signal.SIGTERM, 0.6)
        elapsed = time.monotonic() - began
    assert child.killed
    assert status.signal == signal.SIGKILL
    assert 0.55 <= elapsed < 1.5
    assert marked_pids("t02-") == []


async def test_grandchild_ignoring_term_outlives_leader_until_kill(
    tmp_path: Path,
) -> None:
    write_script(
        tmp_path,
        """
        (trap '' TERM; exec -a t03-stubborn sleep 1000) &
        sleep 1000
        """,
    )
    async with open_process(spec_for(tmp_path), Collector()) as child:
        with trio.fail_after(5):
            while not marked_pids("t03-"):
                await trio.sleep(0.02)
        await child.stop(signal.SIGTERM, 0.5)
    assert marked_pids("t03-") == []


async def test_leftover_group_members_end_with_the_run(tmp_path: Path) -> None:
    write_script(tmp_path, "(exec -a t04-left sleep 1000) &\necho started")
    async with open_process(spec_for(tmp_path), Collector(), stop_timeout=1.0) as child:
        status = await child.wait()
    assert status.exit_code == 0
    assert marked_pids("t04-") == []


async def test_grandchild_holding_pipes_does_not_hang_the_run(tmp_path: Path) -> None:
    # setsid moves the grandchild out of the group, so only the pipe drain
    # timeout can end the output pumps.
    write_script(tmp_path, "setsid bash -c 'exec -a t05-holder sleep 30' &\necho bye")
    output = Collector()
    try:
        with trio.fail_after(5):
            async with open_process(spec_for(tmp_path), output) as child:
                status = await child.wait()
        assert status.exit_code == 0
        assert output.text(Stream.OUT) == ["bye"]
    finally:
        for pid in marked_pids("t05-"):
            os.kill(pid, signal.SIGKILL)
        # SIGKILL takes effect a moment after kill() returns.
        assert wait_until_gone("t05-", 2.0) == []


async def test_cancellation_stops_the_run(tmp_path: Path) -> None:
    write_script(tmp_path, "exec -a t06-sleeper sleep 1000")
    with trio.move_on_after(0.3):
        async with open_process(
            spec_for(tmp_path), Collector(), stop_timeout=1.0
        ) as child:
            await child.wait()
    assert child.exit_status is not None
    assert child.exit_status.signal == signal.SIGTERM
    assert marked_pids("t06-") == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing-folder", "does not exist. Create it"),
        ("missing-script", "'./run.sh' does not exist"),
        ("not-executable", "is not executable. Run 'chmod +x ./run.sh'"),
        ("bad-shebang", "Cannot start './run.sh'"),
    ],
)
async def test_spawn_errors_name_the_problem(
    tmp_path: Path, setup: str, message: str
) -> None:
    folder = tmp_path / "project"
    if setup != "missing-folder":
        folder.mkdir()
    if setup == "not-executable":
        (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
    if setup == "bad-shebang":
        (folder / "run.sh").write_text("#!/no/such/interpreter\necho hi\n")
        (folder / "run.sh").chmod(0o755)
    with pytest.raises(SpawnError, match=re.escape(message)):
        async with open_process(spec_for(folder), Collector()):
            pass


MISSING_INTERPRETER = (
    "Cannot start './run.sh': the interpreter '/nonexistent/interp' named on "
    "its first line was not found. Install it or fix the '#!' line."
)


@pytest.mark.parametrize(
    ("first_line", "message"),
    [
        ("#!/nonexistent/interp", MISSING_INTERPRETER),
        ("#! /nonexistent/interp -x --y", MISSING_INTERPRETER),
        (
            "#!/bin/sh\r",
            "Cannot start './run.sh': the interpreter '/bin/sh\\r' named on its "
            "first line was not found. The line ends with a carriage return: "
            "save the file with Unix (LF) line endings.",
        ),
    ],
)
async def test_missing_interpreter_is_named(
    tmp_path: Path, first_line: str, message: str
) -> None:
    script = tmp_path / "run.sh"
    script.write_text(f"{first_line}\necho hi\n")
    script.chmod(0o755)

    with pytest.raises(SpawnError) as raised:
        async with open_process(spec_for(tmp_path), Collector()):
            pass

    assert str(raised.value) == message


async def test_missing_interpreter_of_program_on_path(tmp_path: Path) -> None:
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    script = bin_folder / "mytool"
    script.write_text("#!/nonexistent/interp\n")
    script.chmod(0o755)
    env = spawn.child_environment({"PATH": str(bin_folder)})
    spec = ProcessSpec(command="mytool --flag", cwd=tmp_path, env=env)

    with pytest.raises(SpawnError) as raised:
        async with open_process(spec, Collector()):
            pass

    assert str(raised.value) == (
        "Cannot start 'mytool': the interpreter '/nonexistent/interp' named on "
        "its first line was not found. Install it or fix the '#!' line."
    )


async def test_missing_program_loader_is_explained(tmp_path: Path) -> None:
    program = Path("/bin/true").read_bytes()
    if b"/ld-linux" not in program:
        pytest.skip("/bin/true names no ld-linux loader on this system")
    # Same length, so the ELF headers stay valid and only the loader is missing.
    (tmp_path / "run.sh").write_bytes(program.replace(b"/ld-linux", b"/ld-nosuc", 1))
    (tmp_path / "run.sh").chmod(0o755)

    with pytest.raises(SpawnError) as raised:
        async with open_process(spec_for(tmp_path), Collector()):
            pass

    assert str(raised.value) == (
        "Cannot start './run.sh': the file exists, so the dynamic loader named in "
        "it is probably missing, as for a program built for another system."
    )


async def test_missing_program_names_the_setting(tmp_path: Path) -> None:
    env = spawn.child_environment({})
    run = ProcessSpec(command="./gone.sh", cwd=tmp_path, env=env)
    probe = ProcessSpec(
        command="./gone.sh", cwd=tmp_path, env=env, setting="health.exec"
    )

    with pytest.raises(SpawnError) as run_error:
        async with open_process(run, Collector()):
            pass
    with pytest.raises(SpawnError) as probe_error:
        async with open_process(probe, Collector()):
            pass

    assert str(run_error.value).endswith("Create it or fix 'command' in the config.")
    assert str(probe_error.value).endswith(
        "Create it or fix 'health.exec' in the config."
    )


def test_frozen_children_get_the_original_loader_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stands in for a PyInstaller bootloader, which sets these variables.
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEI123")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    monkeypatch.setenv("DYLD_LIBRARY_PATH", "/tmp/_MEI123")
    monkeypatch.delenv("DYLD_LIBRARY_PATH_ORIG", raising=False)
    env = spawn.child_environment({"EXTRA": "1"})
    assert env["LD_LIBRARY_PATH"] == "/opt/lib"
    assert "LD_LIBRARY_PATH_ORIG" not in env
    assert "DYLD_LIBRARY_PATH" not in env
    assert env["EXTRA"] == "1"


async def test_find_run_processes_by_environment(tmp_path: Path) -> None:
    write_script(tmp_path, "exec -a t07-found sleep 1000")
    env = spawn.child_environment(
        {"RUNVISOR_PROJECT": "finder", "RUNVISOR_RUN_ID": "987654"}
    )
    spec = ProcessSpec(command="./run.sh", cwd=tmp_path, env=env)
    async with open_process(spec, Collector(), stop_timeout=1.0) as child:
        with trio.fail_after(5):
            while not marked_pids("t07-"):
                await trio.sleep(0.02)
        assert process.find_run_processes("finder", 987654) == [child.pid]
        assert process.find_run_processes("finder", 1) == []
        await process.end_processes([child.pid], timeout=1.0)
        status = await child.wait()
    assert status.signal == signal.SIGTERM


def test_children_do_not_inherit_systemd_notify_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    env = spawn.child_environment({})
    assert "NOTIFY_SOCKET" not in env
    assert "WATCHDOG_USEC" not in env
    assert env["PATH"] == os.environ["PATH"]


async def test_tree_walk_finds_a_process_that_left_the_group(tmp_path: Path) -> None:
    assert spawn.become_subreaper()
    write_script(
        tmp_path,
        """
        setsid bash -c 'exec -a t08-escaped sleep 1000' &
        exec -a t08-leader sleep 1000
        """,
    )
    markers = spawn.run_markers(tmp_path, "walker", 42)
    env = spawn.child_environment(markers)
    spec = ProcessSpec(command="./run.sh", cwd=tmp_path, env=env, markers=markers)
    async with open_process(spec, Collector(), stop_timeout=1.0) as child:
        with trio.fail_after(5):
            while not marked_pids("t08-escaped"):
                await trio.sleep(0.02)
        (escaped,) = marked_pids("t08-escaped")
        candidates = process.run_candidates(child.pid)
        assert candidates is not None
        assert escaped in candidates
        assert child.escaped() == [escaped]
        await child.stop(signal.SIGTERM, 1.0)
    assert marked_pids("t08-") == []


async def test_many_tasks_wait_for_one_leader(tmp_path: Path) -> None:
    write_script(tmp_path, "sleep 0.3; exit 7")
    results: list[int | None] = []

    async def waiter(child: process.ChildProcess) -> None:
        status = await child.wait()
        results.append(status.exit_code)

    async with (
        open_process(spec_for(tmp_path), Collector()) as child,
        trio.open_nursery() as waiters,
    ):
        for _ in range(3):
            waiters.start_soon(waiter, child)
    assert results == [7, 7, 7]


async def test_cancelled_watcher_hands_the_wait_to_another_task(
    tmp_path: Path,
) -> None:
    write_script(tmp_path, "sleep 0.3; exit 3")
    async with open_process(spec_for(tmp_path), Collector()) as child:
        with trio.move_on_after(0.05) as first:
            await child.wait()
        assert first.cancelled_caught
        with trio.fail_after(5):
            status = await child.wait()
    assert status.exit_code == 3


@pytest.fixture
def no_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pidfd_open fail as on kernels before 5.3.

    Faked, because this kernel has it: without it, a leader's exit is
    awaited with waitid(WNOWAIT) in a worker thread.
    """

    def fail(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", fail)


@pytest.mark.usefixtures("no_pidfd")
async def test_exit_is_seen_without_pidfd(tmp_path: Path) -> None:
    write_script(tmp_path, "echo up; sleep 0.2; exit 5")
    output = Collector()
    async with open_process(spec_for(tmp_path), output) as child:
        with trio.fail_after(5):
            status = await child.wait()
    assert status.exit_code == 5
    assert output.text(Stream.OUT) == ["up"]


@pytest.mark.usefixtures("no_pidfd")
async def test_stop_without_pidfd_ends_the_run(tmp_path: Path) -> None:
    # A stop must not hang while a worker thread waits in waitid.
    write_script(tmp_path, "exec sleep 1000")
    async with open_process(spec_for(tmp_path), Collector()) as child:
        with trio.fail_after(5):
            status = await child.stop(signal.SIGTERM, 3.0)
    assert status.signal == signal.SIGTERM


# -- runs held at their gate ------------------------------------------------


@pytest.mark.parametrize(
    ("first_line", "command", "holdable"),
    [
        ("#!/usr/bin/env bash", "./run.sh", True),
        ("#!/bin/bash", "./run.sh", True),
        ("#!/bin/bash -eu", "./run.sh", True),
        ("#!/usr/bin/env bash", "bash run.sh", True),
        # BASH_ENV is skipped in privileged and POSIX mode, and -x would
        # print the gate into the log.
        ("#!/bin/bash -p", "./run.sh", False),
        ("#!/bin/bash -x", "./run.sh", False),
        ("#!/usr/bin/env bash", "bash --posix run.sh", False),
        ("#!/bin/sh", "./run.sh", False),
        ("#!/usr/bin/env python3", "./run.sh", False),
        ("#!/usr/bin/env bash", "bash -c 'echo hi'", False),
    ],
)
def test_only_bash_scripts_can_be_held(
    tmp_path: Path, first_line: str, command: str, holdable: bool
) -> None:
    script = tmp_path / "run.sh"
    script.write_text(f"{first_line}\necho hi\n")
    script.chmod(0o755)
    spec = spec_for(tmp_path, command)
    assert spawn.can_hold(spec, spawn.resolve_argv(spec)) is holdable


def test_hold_refused_with_own_bash_env(tmp_path: Path) -> None:
    write_script(tmp_path, "echo hi")
    spec = ProcessSpec(
        command="./run.sh",
        cwd=tmp_path,
        env=spawn.child_environment({"BASH_ENV": str(tmp_path / "mine.bash")}),
    )
    assert not spawn.can_hold(spec, spawn.resolve_argv(spec))


async def _wait_blocked_in_read(pid: int) -> None:
    """Wait until `pid` sleeps (state S): bash has reached the gate's read."""
    with trio.fail_after(10):
        while True:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "S":
                return
            await trio.sleep(0.01)


async def test_held_run_starts_its_script_only_when_released(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        """
        echo "started $RUNVISOR_PROJECT"
        echo "gate fd: ${RUNVISOR_GATE_FD:-none} bash_env: ${BASH_ENV:-none}"
        ls /proc/$$/fd | tr '\\n' ' '; echo
        bash -c 'echo "child bash_env: ${BASH_ENV:-none}"'
        """,
    )
    gate = process.write_gate_script(tmp_path)
    spec = ProcessSpec(
        command="./run.sh",
        cwd=tmp_path,
        env=spawn.child_environment({}),
        markers={"RUNVISOR_PROJECT": "held"},
    )
    held = process.HeldProcess(spec, gate)
    await _wait_blocked_in_read(held.pid)
    await trio.sleep(0.2)

    output = Collector()
    async with open_process(spec, output, started=held) as child:
        assert child.pid == held.pid
        assert output.lines == []
        held.release()
        status = await child.wait()
    assert status.exit_code == 0
    out = output.text(Stream.OUT)
    assert out[0] == "started held"
    # The gate cleans up after itself: no variable, no open descriptor.
    assert out[1] == "gate fd: none bash_env: none"
    assert sorted(out[2].split()) == ["0", "1", "2", "255"]
    assert out[3] == "child bash_env: none"
    assert output.text(Stream.ERR) == []


async def test_unreleased_held_run_exits_without_running_its_script(
    tmp_path: Path,
) -> None:
    write_script(tmp_path, "touch ran")
    spec = spec_for(tmp_path)
    held = process.HeldProcess(spec, process.write_gate_script(tmp_path))
    await _wait_blocked_in_read(held.pid)
    async with open_process(spec, Collector(), started=held) as child:
        # What the kernel does to the gate when the daemon dies.
        held._close_gate()
        status = await child.wait()
    assert status.exit_code == process.GATE_CLOSED_EXIT_CODE
    assert not (tmp_path / "ran").exists()


async def test_discarded_held_run_is_killed_and_reaped(tmp_path: Path) -> None:
    write_script(tmp_path, "touch ran")
    spec = spec_for(tmp_path)
    held = process.HeldProcess(spec, process.write_gate_script(tmp_path))
    await _wait_blocked_in_read(held.pid)
    held.discard()
    with trio.fail_after(5):
        while Path(f"/proc/{held.pid}").exists():
            await trio.sleep(0.01)
    assert not (tmp_path / "ran").exists()
    held.discard()  # a second discard does nothing


def test_gate_script_is_rewritten_when_changed(tmp_path: Path) -> None:
    path = process.write_gate_script(tmp_path)
    assert path.read_text() == process.GATE_SCRIPT
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("echo tampered\n")
    assert process.write_gate_script(tmp_path).read_text() == process.GATE_SCRIPT
