"""The shell, driven like a person would: through a real pseudo-terminal
(pexpect), with a terminal emulator (pyte) that shows what the screen holds.
Also the shell and the daemon with stdin that is no terminal.

prompt_toolkit asks the terminal for the cursor position; pexpect does not
answer, so the tests set PROMPT_TOOLKIT_NO_CPR to skip the question.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pexpect
import pyte
import pytest

from supervisor.cli import build_parser
from supervisor.control import Client
from supervisor.database import Database
from supervisor.repl import Shell, carries_secret
from supervisor.repl_completion import ShellCompleter, subcommands

from .daemon_process import DaemonProcess, runvisor_argv, wait_until
from .helpers import marked_pids, wait_until_gone, write_script

COLUMNS = 80
ROWS = 24

PROJECTS = """
[projects.hello]
path = "{root}/hello"
trigger = "manual"

[projects.ticker]
path = "{root}/ticker"
trigger = "always_running"
start_seconds = 0
stop_timeout = "2s"
"""


def make_projects(root: Path) -> str:
    write_script(root / "hello", 'echo "hello from $RUNVISOR_RUN_ID"')
    write_script(
        root / "ticker",
        """
        exec -a e2e-repl-ticker bash -c \
          'i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.05; done'
        """,
    )
    return PROJECTS.format(root=root)


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(tmp_path, make_projects(tmp_path))
    yield daemon
    daemon.stop()


@pytest.fixture
def daemon(stopped: DaemonProcess) -> DaemonProcess:
    stopped.start()
    wait_until(lambda: marked_pids("e2e-repl-ticker"))
    return stopped


class Terminal:
    """A command on a pseudo-terminal, its raw output and its screen."""

    def __init__(self, daemon: DaemonProcess, *args: str) -> None:
        argv = [*runvisor_argv(), "--config", str(daemon.config), *args]
        environment = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
        environment.pop("NO_COLOR", None)
        self.child = pexpect.spawn(
            argv[0],
            argv[1:],
            dimensions=(ROWS, COLUMNS),
            env=environment,
            cwd=str(daemon.root),
        )
        self.screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10000)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""

    def pump(self, seconds: float = 0.0) -> None:
        """Read what the program wrote, for at least `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.02)
            except pexpect.TIMEOUT:
                data = b""
            except pexpect.EOF:
                return
            self.raw += data
            self.stream.feed(data)
            if not data and time.monotonic() >= deadline:
                return

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or not self.child.isalive():
                raise AssertionError(
                    "condition not met; screen:\n" + "\n".join(self.rows())
                )
            self.pump(0.05)

    def wait_text(self, text: str, timeout: float = 10.0) -> None:
        self.wait_for(lambda: text in self.plain_output(), timeout)

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def all_rows(self) -> list[str]:
        """Rows scrolled off the top, then the rows on screen."""
        scrolled = [
            "".join(line[column].data for column in range(COLUMNS)).rstrip()
            for line in self.screen.history.top
        ]
        return scrolled + self.rows()

    def plain_output(self) -> str:
        return "\n".join(self.all_rows())

    def type(self, text: str) -> None:
        self.child.send(text.encode())

    def last_row(self) -> str:
        rows = [row for row in self.rows() if row]
        return rows[-1] if rows else ""

    def close(self) -> int | None:
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close()
        return self.child.exitstatus

    def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError("the shell did not exit")
            self.pump(0.05)
        self.child.close()
        assert self.child.exitstatus is not None
        return self.child.exitstatus


@pytest.fixture
def shell(daemon: DaemonProcess) -> Iterator[Terminal]:
    terminal = Terminal(daemon, "shell")
    terminal.wait_text("runvisor>")
    yield terminal
    terminal.close()


def prompt_row(terminal: Terminal) -> str:
    return terminal.rows()[terminal.screen.cursor.y].rstrip()


# Completion and line editing


def test_completion_of_commands_and_projects(shell: Terminal) -> None:
    shell.type("stat\t")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor> status")
    shell.type("\x15")  # Ctrl-U clears the line
    shell.type("trigger he\t")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor> trigger hello")
    shell.type("\x15")
    shell.type("config set tick\t")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor> config set ticker.")
    shell.type("stop_t\t")
    shell.wait_for(
        lambda: prompt_row(shell) == "runvisor> config set ticker.stop_timeout"
    )
    shell.type("\x15")
    shell.type("history --st\t")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor> history --status")


def test_completion_of_run_ids(shell: Terminal, daemon: DaemonProcess) -> None:
    result = daemon.cli("trigger", "hello")
    run_id = result.stdout.split()[2]
    wait_until(lambda: "succeeded" in daemon.cli("history", "hello").stdout)
    shell.type("logs hello \t")
    shell.wait_for(lambda: prompt_row(shell) == f"runvisor> logs hello {run_id}")
    shell.type("\r")
    shell.wait_text(f"hello from {run_id}")


def test_ctrl_c_clears_the_line(shell: Terminal) -> None:
    shell.type("history --limit 3")
    shell.wait_for(lambda: prompt_row(shell).endswith("--limit 3"))
    shell.type("\x03")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor>")
    assert shell.child.isalive()


def test_ctrl_c_stops_a_command_not_the_projects(
    shell: Terminal, daemon: DaemonProcess
) -> None:
    # The run's leader: the ticker's loop also forks a short-lived copy of
    # itself for each `sleep`, which carries the same name.
    status = json.loads(daemon.cli("status", "ticker", "--json").stdout)
    (ticker,) = [p for p in status["projects"] if p["name"] == "ticker"]
    leader = ticker["pid"]
    assert leader in marked_pids("e2e-repl-ticker")
    shell.type("logs ticker -f\r")
    shell.wait_for(lambda: shell.plain_output().count(" out tick ") >= 3)
    shell.child.sendintr()
    shell.wait_text("Interrupted.")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor>")
    assert leader in marked_pids("e2e-repl-ticker")
    shell.type("status ticker\r")
    shell.wait_for(lambda: "running" in shell.plain_output().split("status ticker")[-1])


def test_history_kept_across_sessions(daemon: DaemonProcess) -> None:
    first = Terminal(daemon, "shell")
    try:
        first.wait_text("runvisor>")
        first.type("history --limit 1\r")
        first.wait_text("RUN")
        first.type("\x04")  # Ctrl-D
        assert first.wait_exit() == 0
    finally:
        first.close()
    path = daemon.data_dir / "shell_history"
    assert "history --limit 1" in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600

    second = Terminal(daemon, "shell")
    try:
        second.wait_text("runvisor>")
        second.type("\x1b[A")  # the up arrow
        second.wait_for(lambda: prompt_row(second) == "runvisor> history --limit 1")
    finally:
        second.close()


def test_creds_get_and_bad_numbers_keep_the_shell(tmp_path: Path) -> None:
    secret = "shell-secret-42"
    config = make_projects(tmp_path) + '\n[credentials]\nbackend = "file"\n'
    daemon = DaemonProcess(tmp_path, config)
    added = subprocess.run(
        [*runvisor_argv(), "--config", str(daemon.config), "creds", "add", "tok"],
        input=secret,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert added.returncode == 0, added.stderr
    daemon.start()
    terminal = Terminal(daemon, "shell")
    try:
        terminal.wait_text("runvisor>")
        terminal.type("creds get tok\r")
        terminal.wait_text(secret)
        terminal.type("history --limit 99999999999999999999999999\r")
        terminal.wait_text("the number of rows must be from 1 to 1,000,000")
        terminal.type("status hello\r")
        terminal.wait_for(lambda: terminal.plain_output().count("hello") >= 2)
        assert terminal.child.isalive()
        assert "Traceback" not in terminal.plain_output()
    finally:
        terminal.close()
        daemon.stop()


async def test_failing_command_prints_one_line(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    # No command fails this way on purpose, so the test adds one that raises.
    def fail(args: argparse.Namespace) -> int:
        raise OverflowError("can't serialize ints")

    shell = Shell(stopped.config, interactive=False)
    commands = subcommands(shell.parser)
    commands["version"].set_defaults(handler=fail)
    code = await shell.run_command(["version"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == (
        "runvisor: 'version' failed with an internal error: "
        "OverflowError: can't serialize ints\n"
    )
    assert await shell.run_command(["watch", "off"]) == 0


def test_lines_with_secrets_stay_out_of_history(
    shell: Terminal, daemon: DaemonProcess
) -> None:
    shell.type("config set hello.env.TOKEN.value hidden-value-1\r")
    shell.wait_text("is a secret literal")
    shell.type("config set hello.env.TOKEN \"{ value = 'hidden-value-2' }\"\r")
    shell.wait_for(lambda: shell.plain_output().count("is a secret literal") == 2)
    shell.type("config set hello.env.LEVEL debug\r")
    shell.wait_text("Reloaded:")
    shell.type("\x04")
    assert shell.wait_exit() == 0
    path = daemon.data_dir / "shell_history"
    history = path.read_text()
    assert "hello.env.LEVEL debug" in history
    assert "hidden-value" not in history
    assert "TOKEN" not in history


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("config set web.env.TOKEN.value abc", True),
        ("config set web.env.TOKEN.'value' abc", True),
        ("config set web.env.TOKEN '{ value = \"abc\" }'", True),
        ("config set web.env.TOKEN {value='abc'}", True),
        ("config set web.env.LEVEL debug", False),
        ("config set web.env.MY_VALUE x", False),
        ("config set web.restart never", False),
        ("history --limit 3", False),
    ],
)
def test_carries_secret(line: str, secret: bool) -> None:
    assert carries_secret(line) is secret


# Live output above the prompt


def test_live_lines_never_break_the_typed_line(
    shell: Terminal, daemon: DaemonProcess
) -> None:
    shell.type("follow ticker\r")
    shell.wait_for(lambda: shell.plain_output().count("ticker | tick") >= 5)
    shell.type("sta")
    shell.pump(1.0)
    assert prompt_row(shell) == "runvisor> sta"
    shell.type("tus\r")
    shell.wait_text("RESTARTS")
    shell.type("unfollow ticker\r")
    shell.wait_for(lambda: prompt_row(shell) == "runvisor>")
    shell.pump(0.5)

    rows = shell.all_rows()
    assert "runvisor> status" in rows
    assert not any("runvisor>" in row and re.search(r"tick \d", row) for row in rows)
    ticks = [
        int(number) for number in re.findall(r"ticker \| tick (\d+)", "\n".join(rows))
    ]
    assert len(ticks) >= 20
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert all(len(re.findall(r"tick \d+", row)) <= 1 for row in rows), (
        "two ticks share a row"
    )
    assert shell.last_row() == "runvisor>"
    assert prompt_row(shell) == "runvisor>"


def test_followed_output_is_escaped(tmp_path: Path) -> None:
    write_script(tmp_path / "noisy", "printf 'red \\033[31mtext\\033[2J\\n'")
    daemon = DaemonProcess(
        tmp_path,
        f'[projects.noisy]\npath = "{tmp_path / "noisy"}"\ntrigger = "manual"\n',
    ).start()
    terminal = Terminal(daemon, "shell")
    try:
        terminal.wait_text("runvisor>")
        terminal.type("follow noisy\r")
        terminal.wait_text("Following the output of 'noisy'")
        shown = "noisy | red \\x1b[31mtext\\x1b[2J"
        # The shell subscribes anew after 'follow', so a run that starts
        # before that is not followed: trigger until one is.
        for _ in range(10):
            assert daemon.cli("trigger", "noisy").returncode == 0
            try:
                terminal.wait_text(shown, timeout=1.0)
                break
            except AssertionError:
                continue
        terminal.wait_text(shown, timeout=0.1)
        terminal.wait_text(" completed noisy run ")
    finally:
        terminal.close()
        daemon.stop()
    assert b"\x1b[31mtext" not in terminal.raw
    assert b"\x1b[2J" not in terminal.raw


def test_events_print_above_the_prompt(shell: Terminal, daemon: DaemonProcess) -> None:
    shell.type("trig")
    assert daemon.cli("trigger", "hello").returncode == 0
    shell.wait_text(" completed hello run ")
    shell.pump(0.3)
    assert prompt_row(shell) == "runvisor> trig"
    shell.type("\x15watch off\r")
    shell.wait_text("Live events off.")
    before = shell.plain_output().count(" completed hello run ")
    assert daemon.cli("trigger", "hello").returncode == 0
    wait_until(
        lambda: (
            len(
                daemon.cli(
                    "history", "hello", "--status", "succeeded"
                ).stdout.splitlines()
            )
            == 3
        )
    )
    shell.pump(0.5)
    assert shell.plain_output().count(" completed hello run ") == before


def test_shell_reconnects_to_a_restarted_daemon(
    shell: Terminal, daemon: DaemonProcess
) -> None:
    daemon.stop()
    shell.wait_text("Lost the connection to the daemon")
    daemon.start()
    shell.wait_text("Reconnected to the daemon.", timeout=15)
    shell.type("status hello\r")
    shell.wait_for(lambda: shell.plain_output().count("hello") >= 2)


# runvisor up


def test_up_stops_the_daemon_after_confirmation(stopped: DaemonProcess) -> None:
    terminal = Terminal(stopped, "up")
    try:
        terminal.wait_text("runvisor>", timeout=15)
        wait_until(lambda: marked_pids("e2e-repl-ticker"))
        pids = marked_pids("e2e-repl-ticker")

        # Ctrl-C during a command stops the command, not the in-process
        # daemon nor its projects.
        terminal.type("logs ticker -f\r")
        terminal.wait_for(lambda: terminal.plain_output().count(" out tick ") >= 3)
        terminal.child.sendintr()
        terminal.wait_text("Interrupted.")
        assert marked_pids("e2e-repl-ticker") == pids

        terminal.type("exit\r")
        terminal.wait_text("Leave? [y/N]")
        terminal.type("n\r")
        terminal.wait_for(lambda: prompt_row(terminal) == "runvisor>")
        assert marked_pids("e2e-repl-ticker") == pids

        terminal.type("\x04")
        terminal.wait_for(lambda: terminal.plain_output().count("Leave? [y/N]") == 2)
        terminal.type("y\r")
        assert terminal.wait_exit(15) == 0
    finally:
        terminal.close()
    assert marked_pids("e2e-repl-ticker") == []
    assert not stopped.socket.exists()


# stdin that is no terminal


def test_piped_commands_run_and_exit(daemon: DaemonProcess) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*runvisor_argv(), "--config", str(daemon.config), "shell"],
        input="status\nexit\n",
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert time.monotonic() - started < 5
    assert result.returncode == 0
    assert "NAME" in result.stdout
    assert "ticker" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr
    assert "terminal" not in result.stderr


def test_unknown_command_is_one_line(daemon: DaemonProcess) -> None:
    result = subprocess.run(
        [*runvisor_argv(), "--config", str(daemon.config), "shell"],
        input="frobnicate now\n--json\nstatus hello\n",
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "Unknown command 'frobnicate'. Type 'help' to list the commands.",
        "Unknown command '--json'. Type 'help' to list the commands.",
    ]
    assert "hello" in result.stdout


def test_dev_null_stdin_exits_at_once(daemon: DaemonProcess) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(os.devnull) as devnull:
        result = subprocess.run(
            [*runvisor_argv(), "--config", str(daemon.config), "shell"],
            stdin=devnull,
            capture_output=True,
            text=True,
            timeout=10,
        )
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 0
    assert elapsed < 5
    assert cpu < 1.0
    assert result.stdout == ""
    assert "\x1b" not in result.stderr


def test_shell_without_daemon_exits_3(stopped: DaemonProcess) -> None:
    result = subprocess.run(
        [*runvisor_argv(), "--config", str(stopped.config), "shell"],
        input="status\n",
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 3
    assert "runvisor serve" in result.stderr


def test_up_with_dev_null_stdin_stops_cleanly(stopped: DaemonProcess) -> None:
    with open(os.devnull) as devnull:
        result = subprocess.run(
            [*runvisor_argv(), "--config", str(stopped.config), "up"],
            stdin=devnull,
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 0
    assert "\x1b" not in result.stdout + result.stderr
    assert wait_until_gone("e2e-repl-ticker", 5) == []


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie left for init to reap does not count."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_detached_daemon_writes_no_escape_codes(stopped: DaemonProcess) -> None:
    setsid = shutil.which("setsid")
    if setsid is None:
        pytest.skip("setsid is not installed")
    log = stopped.root / "out.log"
    command = (
        f"{setsid} -f {' '.join(runvisor_argv())} --config {stopped.config} serve "
        f"</dev/null >{log} 2>&1"
    )
    subprocess.run(["bash", "-c", command], check=True, timeout=10)
    try:
        wait_until(lambda: marked_pids("e2e-repl-ticker"))
        assert stopped.cli("trigger", "hello").returncode == 0
        wait_until(lambda: "succeeded" in stopped.cli("history", "hello").stdout)
    finally:
        with Client.connect(stopped.socket) as client:
            daemon_pid = client.daemon_pid
        assert stopped.cli("shutdown").returncode == 0
        wait_until(lambda: not process_alive(daemon_pid), timeout=10)
    output = log.read_bytes()
    assert b"\x1b" not in output
    assert b"terminal" not in output
    assert b"spawned: project=hello" in output


# Completion candidates, without a terminal


def completer_for(daemon: DaemonProcess) -> ShellCompleter:
    return ShellCompleter(build_parser(), daemon.socket, daemon.config)


def values(pairs: list[tuple[str, str]]) -> list[str]:
    return [value for value, _ in pairs]


def test_completer_commands_and_options(stopped: DaemonProcess) -> None:
    completer = completer_for(stopped)
    commands = values(completer.candidates([], ""))
    assert "status" in commands
    assert "watch" in commands
    assert "serve" not in commands
    assert values(completer.candidates(["config"], "")) == ["check", "show", "set"]
    assert "--since" in values(completer.candidates(["history"], "--"))
    assert values(completer.candidates(["history", "--status"], "")) == [
        "running",
        "succeeded",
        "failed",
        "stopped",
        "timed_out",
        "skipped",
        "lost",
    ]
    assert values(completer.candidates(["watch"], "")) == ["on", "off"]


def test_completer_asks_the_daemon(daemon: DaemonProcess) -> None:
    completer = completer_for(daemon)
    assert values(completer.candidates(["stop"], "")) == ["hello", "ticker"]
    assert values(completer.candidates(["events", "hello"], "")) == ["hello", "ticker"]
    assert values(completer.candidates(["logs", "ticker"], "")) != []
    assert values(completer.candidates(["logs", "ticker", "1"], "")) == []
    keys = values(completer.candidates(["config", "set"], "ticker.backoff.i"))
    assert "ticker.backoff.initial" in keys
    keys = values(completer.candidates(["config", "set"], "runvisor.l"))
    assert "runvisor.log_level" in keys


def test_completer_without_daemon_offers_no_projects(stopped: DaemonProcess) -> None:
    completer = completer_for(stopped)
    assert completer.candidates(["stop"], "") == []


def test_completer_offers_credential_nicknames(stopped: DaemonProcess) -> None:
    stopped.data_dir.mkdir(mode=0o700)
    database = Database.open(stopped.data_dir / "runvisor.db")
    try:
        database.add_credential("notion-key", "Notion API", datetime.now(UTC))
        database.add_credential("smtp", "", datetime.now(UTC))
    finally:
        database.close()
    completer = completer_for(stopped)
    assert values(completer.candidates(["creds", "get"], "")) == ["notion-key", "smtp"]
    assert values(completer.candidates(["creds", "delete"], "")) == [
        "notion-key",
        "smtp",
    ]
