"""Health probes against real servers, listeners and scripts on 127.0.0.1.

Probe-only tests with no child process run on `autojump_clock`, so a
timeout of a second passes at once. Tests with real children (exec probes
and the daemon) run on `fast_clock`. Every server binds port 0 and the test
reads the port it got.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from supervisor.config import HealthConfig
from supervisor.health import (
    HealthChange,
    HealthTracker,
    HttpTarget,
    ProbeResult,
    probe_exec,
    probe_http,
    probe_tcp,
    watch,
)
from supervisor.model import (
    Health,
    HealthEvent,
    OnUnhealthy,
    ProjectState,
    RunEvent,
    RunRecord,
    RunStatus,
    StateEvent,
)

from .daemon_harness import WALL_BASE, Harness, running_daemon
from .helpers import marked_pids, write_script

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# Servers and listeners


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Serve `handler` on 127.0.0.1 and yield the bound port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        yield port
        nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream) -> bytes:
    """Read one request head, up to the blank line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def respond(stream: trio.SocketStream, status: str, body: bytes = b"") -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)
    await stream.aclose()


def answer(status: str, body: bytes = b"") -> Handler:
    """A server that reads the request and responds with `status`."""

    async def handle(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await respond(stream, status, body)

    return handle


async def mute(stream: trio.SocketStream) -> None:
    """Accept, read the request and never respond."""
    await read_request(stream)
    await trio.sleep_forever()


async def stall_after_headers(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    await trio.sleep_forever()


async def close_after_request(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.aclose()


async def close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def full_backlog_listener() -> Iterator[int]:
    """A listener whose accept queue is full, so the kernel drops new SYNs
    and a connect hangs until the client gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


# HTTP probe


async def test_http_probe_accepts_2xx_and_3xx(autojump_clock: MockClock) -> None:
    requested: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        requested.append(request.split(b" ")[1])
        if request.startswith(b"GET /redirect "):
            response = b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n"
        elif request.startswith(b"GET /empty "):
            response = b"HTTP/1.1 204 No Content\r\n"
        else:
            response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
        await stream.send_all(response + b"\r\n" + b"ok\n"[: 3 * (b"200" in response)])
        await stream.aclose()

    async with serving(handle) as port:
        results = [
            await probe_http(f"http://127.0.0.1:{port}{path}", timeout=1.0)
            for path in ("/healthz", "/redirect", "/empty")
        ]

    assert [result.ok for result in results] == [True, True, True]
    assert [result.error for result in results] == ["", "", ""]
    assert requested == [b"/healthz", b"/redirect", b"/empty"]


async def test_http_probe_fails_on_500(autojump_clock: MockClock) -> None:
    async with serving(answer("500 Internal Server Error", body=b"db down")) as port:
        url = f"http://127.0.0.1:{port}/healthz"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == f"GET {url} returned 500 Internal Server Error"


async def test_http_probe_fails_on_404(autojump_clock: MockClock) -> None:
    async with serving(answer("404 Not Found")) as port:
        url = f"http://127.0.0.1:{port}/missing"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == f"GET {url} returned 404 Not Found"


async def test_http_probe_sends_one_get(autojump_clock: MockClock) -> None:
    requests: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        requests.append(await read_request(stream))
        await respond(stream, "200 OK")

    async with serving(handle) as port:
        result = await probe_http(
            f"http://127.0.0.1:{port}/status?verbose=1", timeout=1.0
        )

    assert result.ok
    (request,) = requests
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /status?verbose=1 HTTP/1.1"
    headers = {line.split(": ")[0].lower(): line.split(": ")[1] for line in lines[1:-2]}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["connection"] == "close"
    assert headers["user-agent"].startswith("runvisor-health/")


async def test_http_probe_times_out_on_mute_server(
    autojump_clock: MockClock,
) -> None:
    async with serving(mute) as port:
        url = f"http://127.0.0.1:{port}/"
        started = trio.current_time()
        result = await probe_http(url, timeout=2.0)
        elapsed = trio.current_time() - started

    assert not result.ok
    assert result.error == (
        f"GET {url} failed: timed out after 2s waiting for the response"
    )
    assert elapsed == pytest.approx(2.0)
    assert result.duration == pytest.approx(2.0)


async def test_http_probe_times_out_on_stalled_body(
    autojump_clock: MockClock,
) -> None:
    async with serving(stall_after_headers) as port:
        url = f"http://127.0.0.1:{port}/"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == (
        f"GET {url} failed: timed out after 1s reading the response body"
    )
    assert result.duration == pytest.approx(1.0)


async def test_http_probe_stops_reading_a_huge_body(
    autojump_clock: MockClock,
) -> None:
    async def endless_body(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
        await stream.send_all(b"x" * 64 * 1024)
        await trio.sleep_forever()

    async with serving(endless_body) as port:
        result = await probe_http(f"http://127.0.0.1:{port}/", timeout=1.0)

    assert result.ok
    assert result.duration < 0.5


async def test_http_probe_times_out_while_connecting(
    autojump_clock: MockClock,
) -> None:
    with full_backlog_listener() as port:
        url = f"http://127.0.0.1:{port}/"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == f"GET {url} failed: timed out after 1s connecting"


async def test_http_probe_reports_closed_connection(
    autojump_clock: MockClock,
) -> None:
    async with serving(close_after_request) as port:
        url = f"http://127.0.0.1:{port}/"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == (
        f"GET {url} failed: the server closed the connection without a response"
    )


async def test_http_probe_survives_close_at_once(
    autojump_clock: MockClock,
) -> None:
    async with serving(close_at_once) as port:
        url = f"http://127.0.0.1:{port}/"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    # Depending on when the close lands, the client sees an end of file or
    # a reset, and both must be a plain failure.
    assert result.error in (
        f"GET {url} failed: the server closed the connection without a response",
        f"GET {url} failed: the server reset the connection",
    )
    assert result.duration < 1.0


async def test_http_probe_rejects_invalid_response(
    autojump_clock: MockClock,
) -> None:
    async def ssh_banner(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await stream.aclose()

    async with serving(ssh_banner) as port:
        url = f"http://127.0.0.1:{port}/"
        result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error.startswith(f"GET {url} failed: invalid HTTP response: ")


async def test_http_probe_reports_refused_connection(
    autojump_clock: MockClock,
) -> None:
    port = unused_port()
    url = f"http://127.0.0.1:{port}/health"

    result = await probe_http(url, timeout=1.0)

    assert not result.ok
    assert result.error == (
        f"GET {url} failed: cannot connect to 127.0.0.1:{port}: connection refused"
    )


def test_http_target_of_ipv6_url_with_query() -> None:
    target = HttpTarget.parse("http://[::1]:8080/a/b?x=1&y=2")

    assert target.host == "::1"
    assert target.port == 8080
    assert target.host_header == "[::1]:8080"
    assert target.request_target == "/a/b?x=1&y=2"


def test_http_target_defaults() -> None:
    target = HttpTarget.parse("http://localhost")

    assert target.port == 80
    assert target.host_header == "localhost"
    assert target.request_target == "/"


# TCP probe


async def test_tcp_probe_passes_on_open_listener(autojump_clock: MockClock) -> None:
    async with serving(close_at_once) as port:
        result = await probe_tcp(f"127.0.0.1:{port}", timeout=1.0)

    assert result == ProbeResult(ok=True, error="", duration=result.duration)
    assert result.duration < 1.0


async def test_tcp_probe_passes_on_mute_listener(autojump_clock: MockClock) -> None:
    async with serving(mute) as port:
        result = await probe_tcp(f"127.0.0.1:{port}", timeout=1.0)

    assert result.ok


async def test_tcp_probe_fails_on_closed_port(autojump_clock: MockClock) -> None:
    port = unused_port()

    result = await probe_tcp(f"127.0.0.1:{port}", timeout=1.0)

    assert not result.ok
    assert result.error == f"connect to 127.0.0.1:{port} failed: connection refused"


async def test_tcp_probe_times_out(autojump_clock: MockClock) -> None:
    with full_backlog_listener() as port:
        started = trio.current_time()
        result = await probe_tcp(f"127.0.0.1:{port}", timeout=2.0)
        elapsed = trio.current_time() - started

    assert not result.ok
    assert result.error == f"connect to 127.0.0.1:{port} timed out after 2s"
    assert elapsed == pytest.approx(2.0)


# exec probe


def probe_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


async def test_exec_probe_passes_on_exit_0(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path, "exit 0", "check.sh")

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=5)

    assert result.ok
    assert result.error == ""


async def test_exec_probe_reports_exit_code_and_stderr(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(
        tmp_path,
        """
        echo "checking"
        echo "replica lag 42s" >&2
        echo "   " >&2
        echo "done"
        exit 3
        """,
        "check.sh",
    )

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=5)

    assert not result.ok
    assert result.error == (
        "exec probe './check.sh' failed with exit code 3: replica lag 42s"
    )


async def test_exec_probe_reports_stdout_without_stderr(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path, "echo 'no leader elected'; exit 1", "check.sh")

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=5)

    assert result.error == (
        "exec probe './check.sh' failed with exit code 1: no leader elected"
    )


async def test_exec_probe_runs_in_folder_with_env(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(
        tmp_path,
        'echo "$PWD|$PROBE_VALUE|${NOT_PASSED-unset}" > seen.txt',
        "check.sh",
    )
    env = probe_env(PROBE_VALUE="from the run")
    env.pop("NOT_PASSED", None)

    result = await probe_exec("./check.sh", cwd=tmp_path, env=env, timeout=5)

    assert result.ok
    seen = (tmp_path / "seen.txt").read_text().strip()
    assert seen == f"{tmp_path}|from the run|unset"


async def test_exec_probe_kills_hung_command(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path, "exec -a t1h-hung sleep 30", "check.sh")

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=1)

    assert not result.ok
    assert result.error == ("exec probe './check.sh' timed out after 1s and was killed")
    assert 1.0 <= result.duration < 1.5
    assert marked_pids("t1h-") == []


async def test_exec_probe_child_holding_pipe_after_exit(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(
        tmp_path,
        """
        (exec -a t1h-holder sleep 30) &
        echo ready
        exit 0
        """,
        "check.sh",
    )

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=5)

    assert result.ok
    assert result.duration < 1.0
    assert marked_pids("t1h-") == []


async def test_exec_probe_hung_with_child_holding_pipe(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(
        tmp_path,
        """
        (exec -a t1h-holder sleep 30) &
        exec -a t1h-hung sleep 30
        """,
        "check.sh",
    )

    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=1)

    assert not result.ok
    assert "timed out after 1s" in result.error
    assert 1.0 <= result.duration < 1.5
    assert marked_pids("t1h-") == []


async def test_exec_probe_missing_command(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    result = await probe_exec("./check.sh", cwd=tmp_path, env=probe_env(), timeout=1)

    assert not result.ok
    assert result.error.startswith("exec probe './check.sh' could not start: ")
    assert "does not exist" in result.error
    assert result.error.endswith("Create it or fix 'health.exec' in the config.")


# Health tracking


def ok() -> ProbeResult:
    return ProbeResult(ok=True, error="", duration=0.01)


def failed(error: str = "boom") -> ProbeResult:
    return ProbeResult(ok=False, error=error, duration=0.01)


def test_tracker_turns_unhealthy_at_failure_threshold() -> None:
    tracker = HealthTracker(HealthConfig(tcp="h:1", failure_threshold=3), 0.0)

    changes = [tracker.record(failed(f"error {n}"), float(n)) for n in (1, 2, 3, 4)]

    assert changes == [
        None,
        None,
        HealthChange(
            old=Health.UNKNOWN,
            new=Health.UNHEALTHY,
            reason="3 probes in a row failed, the last: error 3",
        ),
        None,
    ]
    assert tracker.must_restart


def test_tracker_success_resets_the_failure_count() -> None:
    tracker = HealthTracker(HealthConfig(tcp="h:1", failure_threshold=2), 0.0)

    results = [failed(), ok(), failed(), ok(), failed()]
    changes = [tracker.record(result, 1.0) for result in results]

    assert tracker.health == Health.HEALTHY
    assert [change.new for change in changes if change] == [Health.HEALTHY]
    assert not tracker.must_restart


def test_tracker_needs_success_threshold_to_recover() -> None:
    config = HealthConfig(
        tcp="h:1",
        failure_threshold=1,
        success_threshold=3,
        on_unhealthy=OnUnhealthy.NONE,
    )
    tracker = HealthTracker(config, 0.0)

    first = tracker.record(failed("down"), 1.0)
    later = [tracker.record(ok(), 1.0) for _ in range(3)]

    assert first == HealthChange(
        old=Health.UNKNOWN, new=Health.UNHEALTHY, reason="the probe failed: down"
    )
    assert not tracker.must_restart
    assert later == [
        None,
        None,
        HealthChange(
            old=Health.UNHEALTHY,
            new=Health.HEALTHY,
            reason="3 probes in a row succeeded",
        ),
    ]


def test_tracker_ignores_failures_in_start_period() -> None:
    config = HealthConfig(tcp="h:1", failure_threshold=1, start_period=10.0)
    tracker = HealthTracker(config, 100.0)

    during = [tracker.record(failed(), at) for at in (101.0, 105.0, 109.9)]
    after = tracker.record(failed(), 110.0)

    assert during == [None, None, None]
    assert after is not None
    assert after.new == Health.UNHEALTHY


def test_tracker_start_period_ends_at_first_success() -> None:
    config = HealthConfig(tcp="h:1", failure_threshold=1, start_period=10.0)
    tracker = HealthTracker(config, 0.0)

    tracker.record(ok(), 1.0)
    change = tracker.record(failed(), 2.0)

    assert change is not None
    assert change.old == Health.HEALTHY
    assert change.new == Health.UNHEALTHY


# watch


@dataclass
class Recorder:
    """Collects what `watch` reports, with trio times."""

    results: list[tuple[float, ProbeResult]] = field(default_factory=list)
    changes: list[tuple[float, HealthChange]] = field(default_factory=list)

    def __call__(self, result: ProbeResult, change: HealthChange | None) -> None:
        now = trio.current_time()
        self.results.append((now, result))
        if change is not None:
            self.changes.append((now, change))

    def probe_spans(self, since: float) -> list[tuple[float, float]]:
        return [
            (end - result.duration - since, end - since) for end, result in self.results
        ]


async def test_watch_returns_error_at_threshold(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    port = unused_port()
    health = HealthConfig(tcp=f"127.0.0.1:{port}", interval=2.0, failure_threshold=3)
    recorder = Recorder()
    start = trio.current_time()

    error = await watch(health, cwd=tmp_path, env={}, on_result=recorder)

    ends = [end - start for end, _ in recorder.results]
    assert ends == pytest.approx([2.0, 4.0, 6.0], abs=0.01)
    assert error == f"connect to 127.0.0.1:{port} failed: connection refused"
    assert [change.new for _, change in recorder.changes] == [Health.UNHEALTHY]


async def test_watch_skips_failures_in_start_period(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    health = HealthConfig(
        tcp=f"127.0.0.1:{unused_port()}",
        interval=2.0,
        start_period=5.0,
        failure_threshold=2,
    )
    recorder = Recorder()
    start = trio.current_time()

    await watch(health, cwd=tmp_path, env={}, on_result=recorder)

    # Probes at 2 s and 4 s fall in the start period; those at 6 s and 8 s
    # count.
    assert trio.current_time() - start == pytest.approx(8.0, abs=0.01)
    assert len(recorder.results) == 4


async def test_watch_slow_probe_delays_the_next(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    async with serving(mute) as port:
        health = HealthConfig(
            http=f"http://127.0.0.1:{port}/",
            interval=1.0,
            timeout=3.0,
            failure_threshold=3,
        )
        recorder = Recorder()
        start = trio.current_time()
        error = await watch(health, cwd=tmp_path, env={}, on_result=recorder)

    spans = recorder.probe_spans(start)
    starts = [span_start for span_start, _ in spans]
    ends = [span_end for _, span_end in spans]
    assert starts == pytest.approx([1, 4, 7], abs=0.01)
    assert ends == pytest.approx([4, 7, 10], abs=0.01)
    assert "timed out after 3s waiting for the response" in error


async def test_watch_without_restart_reports_recovery(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    serving_ok = False

    async def flaky(stream: trio.SocketStream) -> None:
        status = "200 OK" if serving_ok else "503 Service Unavailable"
        await answer(status)(stream)

    async with serving(flaky) as port:
        health = HealthConfig(
            http=f"http://127.0.0.1:{port}/",
            interval=1.0,
            failure_threshold=2,
            success_threshold=2,
            on_unhealthy=OnUnhealthy.NONE,
        )
        recorder = Recorder()
        with trio.move_on_after(9.5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: watch(health, cwd=tmp_path, env={}, on_result=recorder)
                )
                await trio.sleep(3.5)
                serving_ok = True

    assert scope.cancelled_caught
    assert [(change.old, change.new) for _, change in recorder.changes] == [
        (Health.UNKNOWN, Health.UNHEALTHY),
        (Health.UNHEALTHY, Health.HEALTHY),
    ]
    assert "returned 503 Service Unavailable" in recorder.changes[0][1].reason
    assert len(recorder.results) == 9


async def test_watch_cancel_kills_running_exec_probe(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    write_script(tmp_path, "exec -a t1h-slow sleep 30", "check.sh")
    health = HealthConfig(exec="./check.sh", interval=1.0, timeout=10.0)
    seen_running: list[int] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: watch(health, cwd=tmp_path, env=probe_env(), on_result=Recorder())
        )
        while not seen_running:
            await trio.sleep(0.5)
            seen_running = marked_pids("t1h-slow")
        nursery.cancel_scope.cancel()

    assert len(seen_running) == 1
    assert marked_pids("t1h-") == []


# Through the runner: a real daemon on the mock clock


@dataclass(frozen=True)
class ProbeLine:
    """One probe result as the runner logged it; `at` is the trio time."""

    at: float
    ok: bool
    run_id: int
    duration: float
    error: str

    @property
    def started_at(self) -> float:
        return self.at - self.duration


class ProbeLog(logging.Handler):
    """Collects the runner's debug line for each probe result."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[ProbeLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("probe ") or not record.args:
            return
        outcome, _project, run_id, duration, error = record.args
        self.lines.append(
            ProbeLine(
                at=trio.current_time(),
                ok=outcome == "succeeded",
                run_id=int(str(run_id)),
                duration=float(str(duration)),
                error=str(error),
            )
        )

    def of_run(self, run_id: int) -> list[ProbeLine]:
        return [line for line in self.lines if line.run_id == run_id]


@pytest.fixture
def probe_log() -> Iterator[ProbeLog]:
    runner_logger = logging.getLogger("supervisor.runner")
    handler = ProbeLog()
    level = runner_logger.level
    runner_logger.setLevel(logging.DEBUG)
    runner_logger.addHandler(handler)
    try:
        yield handler
    finally:
        runner_logger.removeHandler(handler)
        runner_logger.setLevel(level)


@asynccontextmanager
async def sampling(every: float, sample: Callable[[], None]) -> AsyncIterator[None]:
    """Call `sample` every `every` seconds of trio time while the block runs."""

    async def loop() -> None:
        while True:
            sample()
            await trio.sleep(every)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        yield
        nursery.cancel_scope.cancel()


def app_config(folder: Path, health: str, extra: str = "") -> str:
    """An always-running project `app` with a health table of `health`."""
    return f"""
    [projects.app]
    path = "{folder}"
    trigger = "always_running"
    restart = "always"
    backoff = {{ initial = "1s" }}
    stop_timeout = "2s"
    {extra}

    [projects.app.health]
    {health}
    """


def state_changes(daemon: Harness) -> list[ProjectState]:
    return [event.new for event in daemon.events if isinstance(event, StateEvent)]


def health_events(daemon: Harness) -> list[HealthEvent]:
    return [event for event in daemon.events if isinstance(event, HealthEvent)]


async def stored_health_events(daemon: Harness) -> list[RunEvent]:
    store = daemon.daemon.store
    assert store is not None
    await store.flush()
    events = await store.events("app", limit=None)
    return sorted(
        (event for event in events if event.kind == "health"),
        key=lambda event: event.at,
    )


def wall_seconds(record: RunRecord) -> float:
    return (record.started_at - WALL_BASE).total_seconds()


async def test_healthy_probe_reports_health(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a t1h-app sleep 1000")
    async with serving(answer("200 OK", b"ok")) as port:
        health = f"""
        http = "http://127.0.0.1:{port}/healthz"
        interval = "1s"
        success_threshold = 2
        """
        async with running_daemon(tmp_path, app_config(folder, health)) as daemon:
            runner = daemon.manager.runner("app")
            assert runner.health == Health.UNKNOWN
            await daemon.wait_for(lambda: runner.health == Health.HEALTHY)
            (status,) = daemon.manager.status("app")
            now = daemon.wall.now()
            stored = await stored_health_events(daemon)
            await daemon.manager.stop("app")
            (stopped,) = daemon.manager.status("app")

    assert status.health == Health.HEALTHY
    # No run, no probes: the last result no longer describes the project.
    assert stopped.health == Health.UNKNOWN
    assert status.last_probe_at is not None
    assert status.started_at is not None
    assert (status.last_probe_at - status.started_at).total_seconds() >= 2.0
    assert status.last_probe_at <= now
    (event,) = health_events(daemon)
    assert event.run_id == status.run_id
    assert (event.old, event.new) == (Health.UNKNOWN, Health.HEALTHY)
    assert event.reason == "2 probes in a row succeeded"
    assert [(event.run_id, event.detail) for event in stored] == [
        (status.run_id, "unknown -> healthy: 2 probes in a row succeeded")
    ]


async def test_failing_http_probe_restarts_project(
    tmp_path: Path, fast_clock: MockClock, probe_log: ProbeLog
) -> None:
    """An app that is alive but never serves its health URL is stopped and
    started again through the restart policy, never left down."""
    folder = tmp_path / "app"
    write_script(
        folder,
        """
        echo "start $$" >> starts.log
        exec -a f06-app sleep 1000
        """,
    )
    port = unused_port()
    url = f"http://127.0.0.1:{port}/health"
    health = f"""
    http = "{url}"
    start_period = "1s"
    interval = "1s"
    timeout = "1s"
    failure_threshold = 3
    """
    apps_alive: list[int] = []

    def count_apps() -> None:
        apps_alive.append(len(marked_pids("f06-app")))

    async with running_daemon(tmp_path, app_config(folder, health)) as daemon:
        runner = daemon.manager.runner("app")
        async with sampling(0.5, count_apps):
            await daemon.wait_for(lambda: runner.health == Health.UNHEALTHY)
            (unhealthy_status,) = daemon.manager.status("app")
            first_run_id = unhealthy_status.run_id
            await daemon.wait_for(
                lambda: (
                    runner.status().run_id not in (None, first_run_id)
                    and runner.state == ProjectState.RUNNING
                )
            )
            (running_status,) = daemon.manager.status("app")
        states_before_stop = state_changes(daemon)
        restarts = runner.tracker.restarts
        runs = await daemon.wait_runs("app", 1)
        stored = await stored_health_events(daemon)
        await daemon.manager.stop("app")

    first, second = runs[:2]
    assert first.id == first_run_id
    assert first.status == RunStatus.FAILED
    assert first.reason == (
        f"restarted for health: GET {url} failed: "
        f"cannot connect to 127.0.0.1:{port}: connection refused"
    )
    assert wall_seconds(second) - wall_seconds(first) <= 12
    assert len((folder / "starts.log").read_text().splitlines()) >= 2
    assert max(apps_alive) == 1
    assert unhealthy_status.health == Health.UNHEALTHY
    assert unhealthy_status.state in (
        ProjectState.RUNNING,
        ProjectState.STOPPING,
        ProjectState.BACKOFF,
    )
    # The new run starts with unknown health and fresh counters.
    assert running_status.health == Health.UNKNOWN
    assert restarts >= 1
    assert set(states_before_stop) <= {
        ProjectState.STARTING,
        ProjectState.RUNNING,
        ProjectState.STOPPING,
        ProjectState.BACKOFF,
    }
    assert [line.ok for line in probe_log.of_run(first.id)] == [False] * 3
    assert [(event.run_id, event.detail) for event in stored[:2]] == [
        (
            first.id,
            "unknown -> unhealthy: 3 probes in a row failed, the last: "
            f"GET {url} failed: cannot connect to 127.0.0.1:{port}: "
            "connection refused",
        ),
        (second.id, f"unhealthy -> unknown: run {second.id} started"),
    ]


async def test_hung_exec_probe_is_killed_in_time(
    tmp_path: Path, fast_clock: MockClock, probe_log: ProbeLog
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a f07-app sleep 1000")
    write_script(folder, "exec -a f07-probe sleep 30", "probe.sh")
    health = """
    exec = "./probe.sh"
    timeout = "1s"
    interval = "2s"
    failure_threshold = 2
    """
    probes_alive: list[int] = []
    first_seen: dict[int, float] = {}
    last_seen: dict[int, float] = {}

    def watch_probes() -> None:
        pids = marked_pids("f07-probe")
        now = trio.current_time()
        probes_alive.append(len(pids))
        for pid in pids:
            first_seen.setdefault(pid, now)
            last_seen[pid] = now

    async with running_daemon(tmp_path, app_config(folder, health)) as daemon:
        runner = daemon.manager.runner("app")
        # Seconds from WALL_BASE to the harness's wall clock at trio time 0.
        wall_offset = (daemon.wall.now() - WALL_BASE).total_seconds() - (
            trio.current_time()
        )
        async with sampling(0.5, watch_probes):
            first = (await daemon.wait_runs("app", 1))[0]
            await daemon.wait_for(lambda: len(probe_log.of_run(first.id + 1)) >= 1)
        await daemon.manager.stop("app")
        left_after_stop = marked_pids("f07-probe")
        runs = await daemon.history("app")

    second = min((run for run in runs if run.id > first.id), key=lambda run: run.id)
    assert first.reason == (
        "restarted for health: exec probe './probe.sh' timed out after 1s "
        "and was killed"
    )
    probes = probe_log.of_run(first.id)
    assert [line.ok for line in probes] == [False, False]
    assert all(1.0 <= line.duration < 1.5 for line in probes)
    second_start = wall_seconds(second) - wall_offset
    assert second_start - probes[0].started_at <= 8
    assert max(probes_alive) == 1
    ages = [last_seen[pid] - first_seen[pid] for pid in first_seen]
    assert max(ages) <= 1.5
    assert left_after_stop == []
    assert runner.state == ProjectState.STOPPED


async def test_mute_http_server_fails_probes_in_time(
    tmp_path: Path, fast_clock: MockClock, probe_log: ProbeLog
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a f07-app sleep 1000")
    status_calls: list[tuple[float, float]] = []

    async with serving(mute) as port:
        url = f"http://127.0.0.1:{port}/"
        health = f"""
        http = "{url}"
        timeout = "1s"
        interval = "1s"
        failure_threshold = 3
        """
        async with running_daemon(tmp_path, app_config(folder, health)) as daemon:

            def call_status() -> None:
                before = time.perf_counter()
                daemon.manager.status("app")
                status_calls.append((trio.current_time(), time.perf_counter() - before))

            async with sampling(0.5, call_status):
                first = (await daemon.wait_runs("app", 1))[0]
                await daemon.wait_for(lambda: len(probe_log.of_run(first.id + 1)) >= 2)
            await daemon.manager.stop("app")
            runs = await daemon.history("app")

    timeout_error = f"GET {url} failed: timed out after 1s waiting for the response"
    assert first.reason == f"restarted for health: {timeout_error}"
    assert {line.error for line in probe_log.lines} == {timeout_error}
    assert max(line.duration for line in probe_log.lines) <= 1.5
    second = min((run for run in runs if run.id > first.id), key=lambda run: run.id)
    assert wall_seconds(second) - wall_seconds(first) <= 6
    later = probe_log.of_run(second.id)
    assert later[1].started_at > later[0].started_at
    assert max(seconds for _, seconds in status_calls) < 0.05
    # `status` was served while each probe of the first run was waiting.
    for line in probe_log.of_run(first.id):
        assert any(line.started_at < at < line.at for at, _ in status_calls)


async def test_tcp_probe_to_mute_listener_no_restart(
    tmp_path: Path, fast_clock: MockClock, probe_log: ProbeLog
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a f07-app sleep 1000")

    async with serving(mute) as port:
        health = f"""
        tcp = "127.0.0.1:{port}"
        timeout = "1s"
        interval = "1s"
        failure_threshold = 3
        """
        async with running_daemon(tmp_path, app_config(folder, health)) as daemon:
            runner = daemon.manager.runner("app")
            await daemon.wait_state("app", ProjectState.RUNNING)
            pid = runner.status().pid
            await trio.sleep(20)
            (status,) = daemon.manager.status("app")
            runs = await daemon.history("app")
            await daemon.manager.stop("app")

    assert status.health == Health.HEALTHY
    assert status.pid == pid
    assert status.restarts == 0
    assert [run.status for run in runs] == [RunStatus.RUNNING]
    assert len(probe_log.lines) >= 15
    assert all(line.ok for line in probe_log.lines)


async def test_unhealthy_without_restart_only_reports(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a t1h-app sleep 1000")
    serving_ok = False

    async def flaky(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await respond(stream, "200 OK" if serving_ok else "503 Service Unavailable")

    async with serving(flaky) as port:
        health = f"""
        http = "http://127.0.0.1:{port}/"
        interval = "1s"
        failure_threshold = 2
        on_unhealthy = "none"
        """
        async with running_daemon(tmp_path, app_config(folder, health)) as daemon:
            runner = daemon.manager.runner("app")
            await daemon.wait_for(lambda: runner.health == Health.UNHEALTHY)
            pid = runner.status().pid
            await trio.sleep(10)
            unhealthy_state = runner.state
            unhealthy_runs = await daemon.history("app")
            serving_ok = True
            await daemon.wait_for(lambda: runner.health == Health.HEALTHY)
            healthy_pid = runner.status().pid
            await daemon.manager.stop("app")

    assert unhealthy_state == ProjectState.RUNNING
    assert [run.status for run in unhealthy_runs] == [RunStatus.RUNNING]
    assert healthy_pid == pid
    assert [(event.old, event.new) for event in health_events(daemon)] == [
        (Health.UNKNOWN, Health.UNHEALTHY),
        (Health.UNHEALTHY, Health.HEALTHY),
    ]


async def test_health_restarts_reach_restart_limit(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a t1h-app sleep 1000")
    health = f"""
    tcp = "127.0.0.1:{unused_port()}"
    interval = "2s"
    failure_threshold = 1
    """
    config = app_config(folder, health, 'restart_limit = 2\n    restart_window = "1m"')
    async with running_daemon(tmp_path, config) as daemon:
        runner = daemon.manager.runner("app")
        await daemon.wait_state("app", ProjectState.FATAL)
        runs = await daemon.wait_runs("app", 3)
        reason = runner.reason

    assert len(runs) == 3
    assert [run.status for run in runs] == [RunStatus.FAILED] * 3
    assert all(run.reason.startswith("restarted for health: ") for run in runs)
    assert "restart_limit = 2" in reason
    assert runner.tracker.restarts == 2
    assert marked_pids("t1h-") == []


async def test_exec_probe_gets_run_env_masked(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    folder = tmp_path / "app"
    write_script(folder, "exec -a t1h-app sleep 1000")
    write_script(
        folder,
        """
        echo "$PWD|$RUNVISOR_PROJECT|$RUNVISOR_RUN_ID|$PLAIN" > probe-env.txt
        echo "rejected token $TOKEN" >&2
        exit 1
        """,
        "check.sh",
    )
    health = """
    exec = "./check.sh"
    interval = "1s"
    failure_threshold = 1
    on_unhealthy = "none"
    """
    env = """
    [projects.app.env]
    PLAIN = "plain value"
    TOKEN = { value = "s3cr3t-token-value" }
    """
    async with running_daemon(tmp_path, app_config(folder, health) + env) as daemon:
        runner = daemon.manager.runner("app")
        await daemon.wait_for(lambda: runner.health == Health.UNHEALTHY)
        run_id = runner.status().run_id
        stored = await stored_health_events(daemon)
        await daemon.manager.stop("app")

    seen = (folder / "probe-env.txt").read_text().strip()
    assert seen == f"{folder}|app|{run_id}|plain value"
    (event,) = health_events(daemon)
    assert event.reason == (
        "the probe failed: exec probe './check.sh' failed with exit code 1: "
        "rejected token ***"
    )
    assert "s3cr3t" not in stored[0].detail
    assert stored[0].detail.endswith("rejected token ***")


async def test_health_restart_counts_clean_exit_as_failure(
    tmp_path: Path, fast_clock: MockClock
) -> None:
    """A run stopped for health fails even when the program exits 0 on the
    stop signal, so `restart = "on-failure"` restarts it."""
    folder = tmp_path / "app"
    write_script(
        folder,
        """
        trap 'exit 0' TERM
        (exec -a t1h-app sleep 1000) &
        wait
        """,
    )
    health = f"""
    tcp = "127.0.0.1:{unused_port()}"
    interval = "2s"
    failure_threshold = 1
    """
    config = app_config(folder, health).replace(
        'restart = "always"', 'restart = "on-failure"'
    )
    async with running_daemon(tmp_path, config) as daemon:
        runner = daemon.manager.runner("app")
        first = (await daemon.wait_runs("app", 1))[0]
        await daemon.wait_for(
            lambda: (
                runner.status().run_id not in (None, first.id)
                and runner.state == ProjectState.RUNNING
            )
        )
        restarts = runner.tracker.restarts
        await daemon.manager.stop("app")

    assert first.exit_code == 0
    assert first.status == RunStatus.FAILED
    assert first.reason.startswith("restarted for health: connect to 127.0.0.1:")
    assert restarts == 1
