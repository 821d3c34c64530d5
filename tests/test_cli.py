"""Every CLI command end to end, against a real daemon in a child process.

Most commands run in this process through `cli.main`, which is fast and
captures their output. Commands whose exit status, signals or start-up cost
matter run as their own processes. Everything runs in real time, so each test stays
within a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pexpect
import pytest

from supervisor.cli import build_parser, main
from supervisor.control import Client, RequestFailed
from supervisor.errors import DaemonNotRunning
from supervisor.model import (
    CompletedEvent,
    Health,
    LogEvent,
    ProjectState,
    ProjectStatus,
    RunRecord,
    RunStatus,
    RunTrigger,
    Stream,
    TriggerMode,
)
from supervisor.protocol import (
    HistoryRequest,
    LogsRequest,
    StatusReply,
    StatusRequest,
)
from supervisor.render import Style, format_event, render_status
from supervisor.repl_completion import subcommands

from .daemon_process import DaemonProcess, LineReader, runvisor_argv, wait_until
from .helpers import daemon_pid, marked_pids, wait_until_gone, write_script

# The daemon runs as the single executable under `make test-frozen`.
pytestmark = pytest.mark.frozen

SECRET = "s3cr3t-literal-value"

PROJECTS = """
[projects.hello]
path = "{root}/hello"
trigger = "manual"   # run on request
env = {{ SECRET = {{ value = "{secret}" }}, GREETING = "hi" }}

# a long-running service
[projects.ticker]
path = "{root}/ticker"
trigger = "always_running"
start_seconds = 0
stop_timeout = "2s"

[projects.nightly]
path = "{root}/nightly"
trigger = "schedule"
cron = "0 3 * * *"
timezone = "Europe/Paris"
"""


def make_projects(root: Path) -> str:
    write_script(
        root / "hello",
        """
        echo "$GREETING from run $RUNVISOR_RUN_ID"
        echo "token=$SECRET"
        echo "to stderr" >&2
        """,
    )
    write_script(
        root / "ticker",
        """
        echo start >> starts.log
        exec -a e2e-cli-ticker bash -c \
          'i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.1; done'
        """,
    )
    write_script(root / "nightly", "echo nightly")
    return PROJECTS.format(root=root, secret=SECRET)


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[DaemonProcess]:
    """The config with no daemon running."""
    daemon = DaemonProcess(tmp_path, make_projects(tmp_path))
    yield daemon
    daemon.stop()


@pytest.fixture
def daemon(stopped: DaemonProcess) -> DaemonProcess:
    return stopped.start()


def run(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run a command in this process; return its exit code, stdout, stderr."""
    code = main(["--config", str(daemon.config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def status_json(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    code, out, _ = run(daemon, capsys, "status", "--json")
    assert code == 0
    document: dict = json.loads(out)  # type: ignore[type-arg]
    return document


def project_state(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], name: str
) -> dict:  # type: ignore[type-arg]
    for project in status_json(daemon, capsys)["projects"]:
        if project["name"] == name:
            return project  # type: ignore[no-any-return]
    raise AssertionError(f"{name} is not in the status")


def finished_runs(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], name: str
) -> list[dict]:  # type: ignore[type-arg]
    code, out, _ = run(daemon, capsys, "history", name, "--json")
    assert code == 0
    return [run for run in json.loads(out) if run["status"] != "running"]


# status


def test_status_table(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_until(lambda: marked_pids("e2e-cli-ticker"))
    code, out, err = run(daemon, capsys, "status")
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "TRIGGER", "STATE", "HEALTH"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"hello", "ticker", "nightly"}
    assert "running" in rows["ticker"]
    assert "scheduled" in rows["nightly"]
    assert "(in " in rows["nightly"]
    assert "\x1b" not in out


def test_status_json(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    wait_until(lambda: project_state(daemon, capsys, "ticker")["pid"])
    document = status_json(daemon, capsys)
    assert daemon.process is not None
    assert document["daemon"]["pid"] == daemon_pid(daemon.process.pid)
    assert document["daemon"]["last_reload"] is None
    projects = {project["name"]: project for project in document["projects"]}
    assert list(projects) == ["hello", "ticker", "nightly"]
    assert projects["ticker"]["state"] == "running"
    assert projects["ticker"]["trigger"] == "always_running"
    assert projects["nightly"]["next_fire"] is not None
    assert projects["hello"]["pid"] is None


def test_status_of_unknown_project(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(daemon, capsys, "status", "nope")
    assert code == 1
    assert out == ""
    assert "'nope' is not in the config" in err


def test_status_is_fast_to_import(daemon: DaemonProcess) -> None:
    script = (
        "import sys\n"
        "from supervisor.cli import main\n"
        f"code = main(['--config', {str(daemon.config)!r}, 'status'])\n"
        "heavy = [m for m in ('trio', 'supervisor.config', 'sqlite_utils',"
        " 'prompt_toolkit', 'tomlkit') if m in sys.modules]\n"
        "print('heavy:', heavy, 'code:', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.splitlines()[-1] == "heavy: [] code: 0"


# --config before or after the command

# Arguments that each command needs besides its name.
COMMAND_ARGUMENTS = {
    ("serve",): [],
    ("config",): [],
    ("config", "check"): [],
    ("config", "show"): [],
    ("config", "set"): ["web.restart", "never"],
    ("status",): [],
    ("history",): [],
    ("trigger",): ["web"],
    ("start",): ["web"],
    ("stop",): ["web"],
    ("restart",): ["web"],
    ("logs",): ["web"],
    ("reload",): [],
    ("events",): [],
    ("shutdown",): [],
    ("shell",): [],
    ("up",): [],
    ("next",): ["web"],
    ("version",): [],
    ("creds",): [],
    ("creds", "list"): [],
    ("creds", "add"): ["key"],
    ("creds", "update"): ["key"],
    ("creds", "get"): ["key"],
    ("creds", "delete"): ["key"],
    ("creds", "backend"): [],
    ("export",): ["systemd"],
}


def command_names(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    names = []
    for name, command in subcommands(parser).items():
        names.append((*prefix, name))
        names += command_names(command, (*prefix, name))
    return names


def test_every_command_takes_config_before_and_after() -> None:
    parser = build_parser()
    assert sorted(command_names(parser)) == sorted(COMMAND_ARGUMENTS)
    for words, arguments in COMMAND_ARGUMENTS.items():
        if words in (("config",), ("creds",)):
            arguments = ["check"] if words == ("config",) else ["list"]
        argv = [*words, *arguments]
        assert parser.parse_args(argv).config is None, words
        before = parser.parse_args(["--config", "before.toml", *argv])
        assert before.config == "before.toml", words
        after = parser.parse_args([*words, "--config", "after.toml", *arguments])
        assert after.config == "after.toml", words
        last = parser.parse_args(["--config", "before.toml", *argv, "--config", "x"])
        assert last.config == "x", words


def test_serve_with_config_after_the_command(stopped: DaemonProcess) -> None:
    config = str(stopped.config)
    with stopped.log.open("ab") as log:
        process = subprocess.Popen(
            [*runvisor_argv(), "serve", "--config", config],
            cwd=stopped.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stopped.process = process

    def answers() -> bool:
        try:
            Client.connect(stopped.socket).close()
        except DaemonNotRunning:
            return False
        return True

    wait_until(answers)
    result = subprocess.run(
        [*runvisor_argv(), "status", "nightly", "--config", config],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "scheduled" in result.stdout
    shutdown = subprocess.run(
        [*runvisor_argv(), "shutdown", "--config", config],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shutdown.returncode == 0, shutdown.stderr
    assert process.wait(10) == 0


# no daemon


def test_status_without_daemon_reads_store(stopped: DaemonProcess) -> None:
    result = stopped.cli("status")
    assert result.returncode == 3
    assert "runvisor serve" in result.stderr
    assert "runvisor up" in result.stderr
    assert "store" in result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["hello", "ticker", "nightly"]

    as_json = stopped.cli("status", "--json")
    assert as_json.returncode == 3
    document = json.loads(as_json.stdout)
    assert document["daemon"] is None
    assert [p["state"] for p in document["projects"]] == ["stopped"] * 3


def test_history_without_daemon_reads_store(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    run(daemon, capsys, "trigger", "hello")
    wait_until(lambda: finished_runs(daemon, capsys, "hello"))
    daemon.stop()
    code, out, err = run(daemon, capsys, "history", "hello", "--json")
    assert code == 0
    assert "Reading the history from the store" in err
    assert [run["status"] for run in json.loads(out)] == ["succeeded"]

    code, out, err = run(daemon, capsys, "logs", "hello")
    assert code == 0
    assert "Reading the log file directly" in err
    assert "hi from run" in out


def test_broken_config_still_reaches_the_daemon(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    text = daemon.config.read_text()
    line = text.splitlines().index('trigger = "manual"   # run on request') + 1
    daemon.config.write_text(text.replace('trigger = "manual"', 'trigger = "manual'))

    code, _, err = run(daemon, capsys, "reload")
    assert code == 1
    assert "Reload failed; the previous config stays active" in err
    assert f"{daemon.config}:{line}: invalid TOML" in err

    code, out, err = run(daemon, capsys, "status")
    assert code == 0
    assert err == ""
    assert "failed; the previous config is still active" in out
    assert f"{daemon.config}:{line}: invalid TOML" in out


def test_unreadable_socket_setting_is_a_config_error(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'"{daemon.socket}"', f'"{daemon.socket}'))
    code, out, err = run(daemon, capsys, "status")
    assert code == 1
    assert out == ""
    assert f"{daemon.config}:4: invalid TOML" in err
    assert "No runvisor daemon" not in err

    daemon.config.unlink()
    code, out, err = run(daemon, capsys, "status")
    assert code == 1
    assert out == ""
    assert f"{daemon.config}: config file not found" in err
    assert "No runvisor daemon" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["trigger", "hello"],
        ["stop", "ticker"],
        ["reload"],
        ["events"],
        ["logs", "ticker", "-f"],
        ["shutdown"],
    ],
)
def test_commands_need_a_daemon(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, out, err = run(stopped, capsys, *args)
    assert code == 3
    assert out == ""
    assert "No runvisor daemon is listening on" in err
    assert "'runvisor serve'" in err


def test_usage_error_exits_2(stopped: DaemonProcess) -> None:
    result = stopped.cli("history", "--limit", "many")
    assert result.returncode == 2
    assert "invalid int value" in result.stderr
    result = stopped.cli("history", "--since", "last tuesday")
    assert result.returncode == 2
    assert "neither a time" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["history", "--limit", "99999999999999999999999"],
            "argument --limit: 99999999999999999999999 is out of range: the "
            "number of rows must be from 1 to 1,000,000.",
        ),
        (["history", "--limit", "18446744073709551615"], "from 1 to 1,000,000"),
        (["history", "--limit", "-1"], "-1 is out of range"),
        (["history", "--since", "99999999d"], "reaches back before the year 1"),
        (
            ["logs", "hello", "--tail", "99999999999999999999999"],
            "the number of lines must be from 0 to 1,000,000,000.",
        ),
        (["logs", "hello", "--tail", "-1"], "-1 is out of range"),
        (
            ["logs", "hello", "9223372036854775808"],
            "a run id must be from 1 to 9,223,372,036,854,775,807.",
        ),
        (["next", "nightly", "1001"], "fire times must be from 1 to 1,000."),
        (["next", "nightly", "--after", "yesterday"], "'yesterday' is not an ISO"),
        (
            ["next", "nightly", "--after", "9999-12-31T23:00"],
            "reach past the dates Python can hold",
        ),
    ],
)
def test_out_of_range_values_are_usage_errors(
    stopped: DaemonProcess,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    try:
        code = main(["--config", str(stopped.config), *args])
    except SystemExit as exit:
        code = exit.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert message in err


def test_daemon_rejects_out_of_range_requests(daemon: DaemonProcess) -> None:
    requests = [
        HistoryRequest(limit=2**64 - 1),
        HistoryRequest(limit=0),
        LogsRequest(name="hello", run_id=2**63),
        LogsRequest(name="hello", tail=-1),
    ]
    for request in requests:
        with (
            Client.connect(daemon.socket) as client,
            pytest.raises(RequestFailed) as info,
        ):
            client.request(request)
        assert info.value.kind == "bad_request"
        assert "Invalid message" in str(info.value)
    with Client.connect(daemon.socket) as client:
        assert isinstance(client.request(StatusRequest()), StatusReply)
    log = daemon.log.read_text()
    assert "Traceback" not in log
    assert "internal error" not in log


def test_too_long_socket_path_is_explained(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = f"/tmp/{'x' * 120}/control.sock"
    config = stopped.config.read_text().replace(str(stopped.socket), socket)
    stopped.config.write_text(config)
    code, out, err = run(stopped, capsys, "status")
    assert code == 1
    assert out == ""
    assert f"The control socket path {socket} is {len(socket)} bytes long" in err
    assert "at most 107 bytes" in err


# trigger, history, logs
# trigger, history, logs


def test_trigger_history_and_logs(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(daemon, capsys, "trigger", "hello")
    assert code == 0
    assert out.startswith("Started run ")
    run_id = int(out.split()[2])
    (record,) = wait_until(lambda: finished_runs(daemon, capsys, "hello"))
    assert record["id"] == run_id
    assert record["status"] == "succeeded"
    assert record["trigger"] == "manual"

    code, out, _ = run(daemon, capsys, "history", "hello")
    assert code == 0
    assert out.splitlines()[1].split()[:4] == [
        str(run_id),
        "hello",
        "manual",
        "succeeded",
    ]

    def history_ids(*args: str) -> list[int]:
        code, out, _ = run(daemon, capsys, "history", *args, "--json")
        assert code == 0
        return [run["id"] for run in json.loads(out)]

    assert history_ids("hello", "--status", "failed") == []
    assert history_ids("hello", "--status", "succeeded") == [run_id]
    assert history_ids("hello", "--since", "1h") == [run_id]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert history_ids("hello", "--since", later) == []
    assert len(history_ids("--limit", "1")) == 1

    code, out, _ = run(daemon, capsys, "logs", "hello")
    assert code == 0
    assert f"hi from run {run_id}" in out
    assert "token=***" in out
    assert SECRET not in out
    assert "err to stderr" in " ".join(out.split())

    code, out, _ = run(daemon, capsys, "logs", "hello", str(run_id), "--tail", "1")
    assert code == 0
    assert len(out.splitlines()) == 1

    code, out, _ = run(daemon, capsys, "logs", "hello", str(run_id), "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["run_id"] for line in lines} == {run_id}
    assert {"out", "err"} == {line["stream"] for line in lines}

    code, _, err = run(daemon, capsys, "logs", "hello", "999")
    assert code == 1
    assert "has no run 999" in err


def test_history_and_logs_of_a_removed_project(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(daemon, capsys, "trigger", "hello")
    run_id = int(out.split()[2])
    wait_until(lambda: finished_runs(daemon, capsys, "hello"))
    text = daemon.config.read_text()
    without_hello = re.sub(r"\[projects\.hello\]\n(?:[^\[\n#][^\n]*\n)*", "", text)
    assert "hello" not in without_hello
    daemon.config.write_text(without_hello)
    code, out, _ = run(daemon, capsys, "reload")
    assert code == 0
    assert "stop     hello" in out

    def check_history_and_logs() -> None:
        code, out, err = run(daemon, capsys, "history", "hello", "--json")
        assert code == 0, err
        assert [record["id"] for record in json.loads(out)] == [run_id]
        code, out, err = run(daemon, capsys, "logs", "hello")
        assert code == 0, err
        assert f"hi from run {run_id}" in out
        code, _, err = run(daemon, capsys, "history", "nope")
        assert code == 1
        assert "'nope' is not in the config" in err
        code, _, err = run(daemon, capsys, "logs", "nope")
        assert code == 1
        assert "'nope' is not in the config" in err

    check_history_and_logs()
    code, out, _ = run(daemon, capsys, "logs", "hello", "-f")
    assert code == 0
    assert f"hi from run {run_id}" in out
    assert out.endswith(
        "-- Project 'hello' is no longer in the config, so no new output follows.\n"
    )

    daemon.stop()
    check_history_and_logs()


def test_stop_start_restart(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    first = wait_until(lambda: marked_pids("e2e-cli-ticker"))
    code, out, _ = run(daemon, capsys, "stop", "ticker")
    assert code == 0
    assert out == "Stopped 'ticker'.\n"
    assert marked_pids("e2e-cli-ticker") == []
    assert project_state(daemon, capsys, "ticker")["state"] == "stopped"

    code, _, _ = run(daemon, capsys, "start", "ticker")
    assert code == 0
    second = wait_until(lambda: marked_pids("e2e-cli-ticker"))
    assert second != first

    code, _, _ = run(daemon, capsys, "restart", "ticker")
    assert code == 0
    third = wait_until(lambda: marked_pids("e2e-cli-ticker"))
    assert third != second
    runs = finished_runs(daemon, capsys, "ticker")
    assert [run["status"] for run in runs] == ["stopped", "stopped"]
    assert [run["reason"] for run in runs] == ["stopped by user"] * 2


def test_status_last_run_is_the_current_run(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    first = wait_until(lambda: project_state(daemon, capsys, "ticker")["run_id"])
    code, _, _ = run(daemon, capsys, "restart", "ticker")
    assert code == 0

    def new_run_id() -> int | None:
        run_id: int | None = project_state(daemon, capsys, "ticker")["run_id"]
        return None if run_id == first else run_id

    second = wait_until(new_run_id)
    ticker = project_state(daemon, capsys, "ticker")
    assert ticker["last_run"]["id"] == second
    assert ticker["last_run"]["status"] == "running"
    code, out, _ = run(daemon, capsys, "status", "ticker")
    assert code == 0
    assert f"#{second} running" in out


def test_restart_says_restarting(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_until(lambda: project_state(daemon, capsys, "ticker")["pid"])
    code, out, _ = run(daemon, capsys, "restart", "ticker")
    assert code == 0
    assert out == "Restarting project 'ticker'.\n"
    code, out, _ = run(daemon, capsys, "restart", "nightly")
    assert code == 0
    assert out == "Restarted the schedule of 'nightly'.\n"


def test_health_without_probe_is_a_dash(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_until(lambda: project_state(daemon, capsys, "ticker")["pid"])
    code, out, _ = run(daemon, capsys, "status")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["ticker"][3] == "-"
    assert project_state(daemon, capsys, "ticker")["has_probe"] is False

    probed = ProjectStatus(
        name="web",
        trigger=TriggerMode.ALWAYS_RUNNING,
        state=ProjectState.RUNNING,
        health=Health.HEALTHY,
        has_probe=True,
    )
    now = datetime(2026, 1, 5, 12, 5, tzinfo=UTC)
    (_, row) = render_status([probed], now, Style(), None)
    assert row.split()[3] == "healthy"


def test_logs_follow_across_restarts(daemon: DaemonProcess) -> None:
    wait_until(lambda: marked_pids("e2e-cli-ticker"))
    follower = daemon.popen("logs", "ticker", "-f")
    assert follower.stdout is not None
    lines = LineReader(follower.stdout)
    seen: list[str] = []
    try:
        while not any("tick" in line for line in seen):
            seen.append(lines.next())
        assert daemon.cli("restart", "ticker").returncode == 0
        while not any("started (manual)" in line for line in seen):
            seen.append(lines.next())
        after_restart = len(seen)
        while not any("tick 0" in line for line in seen[after_restart:]):
            seen.append(lines.next())
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(5)
        lines.close()
        assert follower.stderr is not None
        follower.stderr.close()
    assert code == 130
    markers = [line for line in seen if line.startswith("-- run")]
    assert "stopped: stopped by user" in markers[0]
    assert "started (manual)" in markers[1]


@pytest.mark.parametrize("args", [["events"], ["logs", "ticker", "-f"]])
def test_followers_exit_3_when_the_daemon_stops(
    daemon: DaemonProcess, args: list[str]
) -> None:
    wait_until(lambda: marked_pids("e2e-cli-ticker"))
    follower = daemon.popen(*args)
    assert follower.stdout is not None
    lines = LineReader(follower.stdout)
    try:
        # Reading a tick proves the stream is live before the daemon goes.
        while "tick" not in lines.next():
            pass
        daemon.stop()
        code = follower.wait(10)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        lines.close()
        assert follower.stderr is not None
        err = follower.stderr.read()
        follower.stderr.close()
    assert code == 3
    assert "The daemon closed the connection: it stopped or restarted." in err


def trigger_once_subscribed(daemon: DaemonProcess, output: LineReader) -> int:
    """Trigger `hello` until the listener prints something, which proves
    its subscription is live, then trigger it once more; return that run's
    id."""
    deadline = time.monotonic() + 10
    while True:
        assert daemon.cli("trigger", "hello").returncode == 0
        if output.ready(0.5):
            break
        assert time.monotonic() < deadline, "the listener printed nothing"
    result = daemon.cli("trigger", "hello")
    assert result.returncode == 0
    return int(result.stdout.split()[2])


def test_events_stream(daemon: DaemonProcess) -> None:
    listener = daemon.popen("events", "hello", "--json")
    assert listener.stdout is not None
    output = LineReader(listener.stdout)
    try:
        run_id = trigger_once_subscribed(daemon, output)
        events: list[dict] = []  # type: ignore[type-arg]
        while not (
            events
            and events[-1]["type"] == "completed"
            and events[-1]["run_id"] == run_id
        ):
            event = json.loads(output.next())
            of_run = event.get("run_id") == run_id
            if of_run or f"run {run_id} " in event.get("reason", ""):
                events.append(event)
    finally:
        listener.send_signal(signal.SIGINT)
        code = listener.wait(5)
        output.close()
        assert listener.stderr is not None
        listener.stderr.close()
    assert code == 130
    kinds = [event["type"] for event in events]
    assert kinds[0] == "state"
    assert "started" in kinds
    assert "log" in kinds
    assert {event.get("project") for event in events} == {"hello"}
    texts = [event["text"] for event in events if event["type"] == "log"]
    assert "token=***" in texts


def test_events_text_lines(daemon: DaemonProcess) -> None:
    listener = daemon.popen("events", "hello", "--no-logs")
    assert listener.stdout is not None
    output = LineReader(listener.stdout)
    try:
        run_id = trigger_once_subscribed(daemon, output)
        lines: list[str] = []
        while not lines or f" completed hello run {run_id} " not in lines[-1]:
            lines.append(output.next())
    finally:
        listener.send_signal(signal.SIGINT)
        listener.wait(5)
        output.close()
        assert listener.stderr is not None
        listener.stderr.close()
    kinds = [line.split()[1] for line in lines]
    assert "started" in kinds
    assert "log" not in kinds
    assert lines[-1].split()[1:5] == ["completed", "hello", "run", lines[-1].split()[4]]


# config


def test_config_show_masks_secrets(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(daemon, capsys, "config", "show")
    assert code == 0
    assert SECRET not in out
    assert 'SECRET = "***"' in out
    assert "[projects.ticker]" in out
    assert 'stop_timeout = "2s"' in out
    assert 'restart = "always"' in out  # a default, filled in

    code, out, _ = run(daemon, capsys, "config", "show", "hello", "--json")
    document = json.loads(out)
    assert document["source"] == str(daemon.config)
    assert document["projects"]["hello"]["env"]["SECRET"] == "***"
    assert document["projects"]["hello"]["env"]["GREETING"] == "hi"
    assert list(document["projects"]) == ["hello"]

    code, _, err = run(daemon, capsys, "config", "show", "nope")
    assert code == 1
    assert "'nope' is not in the config" in err


def test_config_check_json(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(stopped, capsys, "config", "check", "--json")
    assert code == 0
    assert json.loads(out) == {"ok": True, "errors": [], "warnings": []}
    broken = stopped.root / "broken.toml"
    broken.write_text('[projects.x]\npath = "/tmp"\ntrigger = "sometimes"\n')
    code, out, _ = run(stopped, capsys, "config", "check", str(broken), "--json")
    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False
    assert f"{broken}:3:" in document["errors"][0]


def test_config_set_keeps_comments_and_reloads(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    before = daemon.config.read_text()
    code, out, err = run(daemon, capsys, "config", "set", "ticker.stop_timeout", "3s")
    assert code == 0, err
    assert 'ticker.stop_timeout = "3s"' in out
    assert "restart  ticker" in out
    after = daemon.config.read_text()
    assert after == before.replace('stop_timeout = "2s"', 'stop_timeout = "3s"')
    assert "# a long-running service" in after
    assert "# run on request" in after

    code, out, _ = run(daemon, capsys, "config", "show", "ticker", "--json")
    assert json.loads(out)["projects"]["ticker"]["stop_timeout"] == "3s"

    code, out, _ = run(daemon, capsys, "config", "set", "ticker.backoff.initial", "2s")
    assert code == 0
    assert 'backoff.initial = "2s"' in daemon.config.read_text()
    code, out, _ = run(daemon, capsys, "config", "set", "hello.env.LEVEL", "debug")
    assert code == 0
    assert "update   hello" in out
    assert 'LEVEL = "debug"' in daemon.config.read_text()


@pytest.mark.parametrize("key", ["runvisor.socket", "runvisor.data_dir"])
def test_config_set_keeps_daemon_paths_while_it_runs(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    assert daemon.process is not None
    before = daemon.config.read_bytes()
    code, out, err = run(daemon, capsys, "config", "set", key, "elsewhere")
    assert code == 1
    assert out == ""
    pid = daemon_pid(daemon.process.pid)
    assert f"{key} cannot change while the daemon (pid {pid})" in err
    assert "'runvisor shutdown'" in err
    assert "'runvisor serve'" in err
    assert daemon.config.read_bytes() == before

    same = str(daemon.socket if key == "runvisor.socket" else daemon.data_dir)
    code, out, err = run(daemon, capsys, "config", "set", key, same)
    assert code == 0, err
    assert "Reloaded:" in out
    code, _, _ = run(daemon, capsys, "status")
    assert code == 0


def test_config_set_without_daemon_says_so(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    other = stopped.root / "other.sock"
    code, out, err = run(
        stopped, capsys, "config", "set", "runvisor.socket", str(other)
    )
    assert code == 0
    assert f'runvisor.socket = "{other}"' in out
    assert err == f"runvisor: not reloaded: no daemon is running on {other}.\n"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ticker.restart", "sometimes", "projects.ticker.restart: invalid value"),
        ("ticker.stop_timeout", "soon", "ticker.stop_timeout"),
        ("ticker.colour", "blue", "colour"),
        ("nope.restart", "never", "does not name a key of a project"),
        ("hello.env.TOKEN.value", "abc", "secret literal"),
        ("hello.env.TOKEN", "{ value = 'abc' }", "secret literal"),
        ("hello.cron", "61 * * * *", "cron"),
    ],
)
def test_config_set_invalid_leaves_file_identical(
    stopped: DaemonProcess,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
    message: str,
) -> None:
    before = stopped.config.read_bytes()
    code, out, err = run(stopped, capsys, "config", "set", key, value)
    assert code == 1
    assert out == ""
    assert message in err
    assert stopped.config.read_bytes() == before
    assert [p.name for p in stopped.root.iterdir() if p.name.startswith(".")] == []


def test_reload_dry_run_then_apply_then_fail(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = wait_until(lambda: project_state(daemon, capsys, "ticker")["pid"])
    text = daemon.config.read_text()
    write_script(daemon.root / "extra", "echo extra")
    daemon.config.write_text(
        text.replace('GREETING = "hi"', 'GREETING = "hello"')
        + f'\n[projects.extra]\npath = "{daemon.root / "extra"}"\ntrigger = "manual"\n'
    )

    code, out, _ = run(daemon, capsys, "reload", "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "Dry run, nothing changed:",
        "  start    extra",
        "  update   hello",
        "  keep     ticker, nightly",
        "Updated projects are not restarted: their next run uses the new settings.",
    ]
    assert "extra" not in [p["name"] for p in status_json(daemon, capsys)["projects"]]

    code, out, _ = run(daemon, capsys, "reload", "--json")
    assert code == 0
    reply = json.loads(out)
    assert reply["ok"] is True
    assert reply["added"] == ["extra"]
    assert reply["updated"] == ["hello"]
    assert project_state(daemon, capsys, "ticker")["pid"] == pid

    daemon.config.write_text(text + '\n[projects.broken]\ntrigger = "sometimes"\n')
    code, out, err = run(daemon, capsys, "reload")
    assert code == 1
    assert f"{daemon.config}:" in err
    assert "previous config stays active" in err
    code, out, _ = run(daemon, capsys, "status")
    assert "failed; the previous config is still active" in out
    assert f"{daemon.config}:" in out
    assert "extra" in out  # the previous config, with extra, is active
    assert project_state(daemon, capsys, "ticker")["pid"] == pid


# next


def test_next_lists_zone_and_utc(
    stopped: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("next", "nightly", "3", "--after", "2022-10-29T12:00+02:00")
    code, out, _ = run(stopped, capsys, *args)
    assert code == 0
    assert out.splitlines() == [
        "nightly: 0 3 * * *  (At 03:00)",
        "Europe/Paris               UTC",
        "2022-10-30T03:00:00+01:00  2022-10-30T02:00:00Z",
        "2022-10-31T03:00:00+01:00  2022-10-31T02:00:00Z",
        "2022-11-01T03:00:00+01:00  2022-11-01T02:00:00Z",
    ]
    code, out, _ = run(stopped, capsys, *args, "--json")
    document = json.loads(out)
    assert document["timezone"] == "Europe/Paris"
    assert document["description"] == "At 03:00"
    assert document["next"][0] == "2022-10-30T03:00:00+01:00"

    code, _, err = run(stopped, capsys, "next", "hello")
    assert code == 1
    assert "has no schedule" in err


# shutdown


def test_shutdown_leaves_no_grandchildren(tmp_path: Path) -> None:
    write_script(
        tmp_path / "tree",
        """
        echo start >> starts.log
        (exec -a f01-bg sleep 1000) &
        (exec -a f01-pipe-a sleep 1000) | (exec -a f01-pipe-b cat) &
        wait
        """,
    )
    daemon = DaemonProcess(
        tmp_path,
        f"""
        [projects.tree]
        path = "{tmp_path / "tree"}"
        trigger = "always_running"
        restart = "always"
        stop_timeout = "3s"
        """,
    ).start()
    try:
        wait_until(lambda: len(marked_pids("f01-")) == 3)
        result = daemon.cli("shutdown")
        # The command returns once the daemon has exited, not only its runs.
        exited_by_return = daemon.process.poll() is not None
        left = wait_until_gone("f01-", 4.0)
        exit_code = daemon.wait(10)
    finally:
        daemon.stop()
    assert result.returncode == 0
    assert result.stdout.startswith("Shutting down: stopping every project.\n")
    assert "has stopped every project and exited" in result.stdout
    assert exited_by_return
    assert left == []
    assert exit_code == 0
    assert (tmp_path / "tree" / "starts.log").read_text() == "start\n"
    history = daemon.cli("history", "tree", "--json")
    (record,) = json.loads(history.stdout)
    assert record["status"] == "stopped"
    assert record["reason"] == "the daemon is shutting down"


# colour and width


def test_colour_only_on_a_terminal(daemon: DaemonProcess) -> None:
    argv = [*runvisor_argv(), "--config", str(daemon.config), "status"]
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    coloured = pexpect.run(argv[0], args=argv[1:], env=environment, timeout=20)
    plain = pexpect.run(
        argv[0], args=argv[1:], env={**environment, "NO_COLOR": "1"}, timeout=20
    )
    piped = daemon.cli("status")
    assert b"\x1b[" in coloured
    assert b"scheduled" in coloured
    assert b"\x1b" not in plain
    assert b"scheduled" in plain
    assert "\x1b" not in piped.stdout


NOISY_OUTPUT = "red \x1b[31mtext\x1b[0m\x07 back\ttab"


def test_control_characters_are_escaped_on_a_terminal(tmp_path: Path) -> None:
    write_script(
        tmp_path / "noisy", "printf 'red \\033[31mtext\\033[0m\\a back\\ttab\\n'"
    )
    daemon = DaemonProcess(
        tmp_path,
        f'[projects.noisy]\npath = "{tmp_path / "noisy"}"\ntrigger = "manual"\n',
    ).start()
    try:
        assert daemon.cli("trigger", "noisy").returncode == 0
        wait_until(lambda: "succeeded" in daemon.cli("history", "noisy").stdout)
        argv = [*runvisor_argv(), "--config", str(daemon.config), "logs", "noisy"]
        shown = pexpect.run(
            argv[0], args=argv[1:], env={**os.environ, "NO_COLOR": "1"}, timeout=20
        )
        piped = daemon.cli("logs", "noisy")
        as_json = daemon.cli("logs", "noisy", "--json")
    finally:
        daemon.stop()
    assert b"out red \\x1b[31mtext\\x1b[0m\\x07 back\ttab\r\n" in shown
    assert b"\x1b" not in shown
    assert b"\x07" not in shown
    assert piped.stdout.endswith(f" out {NOISY_OUTPUT}\n")
    (line,) = [json.loads(text) for text in as_json.stdout.splitlines()]
    assert line["text"] == NOISY_OUTPUT


def test_status_reason_is_escaped() -> None:
    status = ProjectStatus(
        name="noisy",
        trigger=TriggerMode.MANUAL,
        state=ProjectState.EXITED,
        reason="probe said \x1b[2Jcleared",
    )
    now = datetime(2026, 1, 5, 12, 5, tzinfo=UTC)
    lines = render_status([status], now, Style(escape=True), 200)
    assert lines[1].endswith("probe said \\x1b[2Jcleared")
    assert "\x1b" not in "".join(lines)


def test_event_lines_are_escaped() -> None:
    at = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    line = LogEvent(project="noisy", run_id=3, stream=Stream.OUT, text="\x1b[2J", at=at)
    completed = CompletedEvent(
        project="noisy",
        run_id=3,
        status=RunStatus.FAILED,
        exit_code=1,
        signal=None,
        reason="probe output \r\x1b[1A",
        at=at,
    )
    assert format_event(line, Style(escape=True)).endswith(" out: \\x1b[2J")
    assert format_event(completed, Style(escape=True)).endswith(
        "failed: probe output \\x0d\\x1b[1A"
    )
    assert format_event(line, Style()).endswith(" out: \x1b[2J")


def example_status(index: int) -> ProjectStatus:
    at = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    return ProjectStatus(
        name=f"project-with-a-long-name-{index}",
        trigger=TriggerMode.ALWAYS_RUNNING,
        state=ProjectState.BACKOFF,
        reason="restarting in 4s after run 12 failed: exit code 3 " * 2,
        health=Health.UNHEALTHY,
        pid=123456,
        started_at=at,
        restarts=7,
        last_run=RunRecord(
            id=12,
            project="x",
            trigger=RunTrigger.RESTART,
            status=RunStatus.FAILED,
            started_at=at,
            ended_at=at,
        ),
    )


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_status_table_fits_width(width: int) -> None:
    projects = [example_status(index) for index in range(3)]
    now = datetime(2026, 1, 5, 12, 5, tzinfo=UTC)
    lines = render_status(projects, now, Style(color=True), width)
    plain = [line.replace("\x1b[0m", "") for line in lines]
    for line in plain:
        visible = "".join(part.split("m", 1)[-1] for part in line.split("\x1b["))
        assert len(visible) <= width
    assert all("project-with" in line for line in plain[1:])
    assert all("backoff" in line for line in plain[1:])


def test_status_table_uncut_without_width() -> None:
    projects = [example_status(index) for index in range(2)]
    now = datetime(2026, 1, 5, 12, 5, tzinfo=UTC)
    lines = render_status(projects, now, Style(color=False), None)
    assert all("…" not in line for line in lines)
    assert "#12 failed 5m00s ago" in lines[1]
    assert "restarting in 4s" in lines[1]
