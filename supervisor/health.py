"""Health probes of always-running projects: exec, HTTP and TCP.

Each probe call is bounded by the probe's `timeout`, whatever the other side
does. A command that hangs is killed with its whole process group, and an
HTTP server that accepts and never responds, or stalls in the middle of a
response, fails the probe once the timeout has passed.

`watch` probes one run until the run ends. The first probe runs one
`interval` after the start, and probes never overlap: the next one starts
`interval` after the previous one started, or as soon as it ended when it
took longer. `HealthTracker` turns the results into health changes with the
thresholds and the start period. All durations use trio's clock.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from supervisor import __version__
from supervisor.config import HealthConfig, format_duration
from supervisor.errors import SpawnError
from supervisor.model import Health, OnUnhealthy, Stream
from supervisor.process import open_process
from supervisor.spawn import ProcessSpec

if TYPE_CHECKING:
    import h11

# Bytes read from an HTTP response per receive call.
RECEIVE_BYTES = 4096
# An HTTP probe reads at most this much of the response body, then decides.
MAX_BODY_BYTES = 10 * 1024
# Probe output and response texts quoted in a failure are cut to this length.
MAX_DETAIL_CHARS = 200
USER_AGENT = f"runvisor-health/{__version__}"


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe call. `error` is empty when `ok` is true, and
    `duration` is in seconds of trio's clock."""

    ok: bool
    error: str
    duration: float


@dataclass(frozen=True)
class HealthChange:
    old: Health
    new: Health
    reason: str


ResultCallback = Callable[[ProbeResult, HealthChange | None], None]


class HealthTracker:
    """Counts consecutive probe results of one run and decides its health.

    Health starts `unknown`. It turns `healthy` after `success_threshold`
    successes in a row and `unhealthy` after `failure_threshold` counted
    failures in a row. A failure of a probe that started within
    `start_period` after the run started is not counted, unless a probe of
    this run has already succeeded (as Docker's `--start-period` does).
    """

    def __init__(self, health: HealthConfig, started_at: float) -> None:
        self.config = health
        self.started_at = started_at
        self.health = Health.UNKNOWN
        self.successes = 0
        self.failures = 0
        self._seen_success = False

    @property
    def must_restart(self) -> bool:
        return (
            self.health == Health.UNHEALTHY
            and self.config.on_unhealthy == OnUnhealthy.RESTART
        )

    def record(
        self, result: ProbeResult, probe_started_at: float
    ) -> HealthChange | None:
        """Count one result and return the health change it causes, if any."""
        if result.ok:
            self._seen_success = True
            self.failures = 0
            self.successes += 1
            if self.successes >= self.config.success_threshold:
                return self._change(Health.HEALTHY, self._success_reason())
            return None

        self.successes = 0
        in_start_period = (
            probe_started_at < self.started_at + self.config.start_period
            and not self._seen_success
        )
        if in_start_period:
            return None
        self.failures += 1
        if self.failures >= self.config.failure_threshold:
            return self._change(Health.UNHEALTHY, self._failure_reason(result))
        return None

    def _change(self, new: Health, reason: str) -> HealthChange | None:
        old = self.health
        if old == new:
            return None
        self.health = new
        return HealthChange(old=old, new=new, reason=reason)

    def _success_reason(self) -> str:
        if self.successes == 1:
            return "the probe succeeded"
        return f"{self.successes} probes in a row succeeded"

    def _failure_reason(self, result: ProbeResult) -> str:
        if self.failures == 1:
            return f"the probe failed: {result.error}"
        return f"{self.failures} probes in a row failed, the last: {result.error}"


async def watch(
    health: HealthConfig,
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_result: ResultCallback,
) -> str:
    """Probe one run until it must be restarted, and return the last error.

    `on_result` gets every result with the health change it caused, if any.
    With `on_unhealthy = "none"` this never returns; the caller cancels it
    when the run ends, which also kills a running exec probe.
    """
    tracker = HealthTracker(health, trio.current_time())
    next_probe_at = tracker.started_at + health.interval
    while True:
        await trio.sleep_until(next_probe_at)
        probe_started_at = trio.current_time()
        result = await run_probe(health, cwd=cwd, env=env)
        change = tracker.record(result, probe_started_at)
        on_result(result, change)
        if tracker.must_restart:
            return result.error
        next_probe_at = max(probe_started_at + health.interval, trio.current_time())


async def run_probe(
    health: HealthConfig, *, cwd: Path, env: Mapping[str, str]
) -> ProbeResult:
    """Run the one probe that `health` configures."""
    if health.exec is not None:
        return await probe_exec(health.exec, cwd=cwd, env=env, timeout=health.timeout)
    if health.http is not None:
        return await probe_http(health.http, timeout=health.timeout)
    if health.tcp is not None:
        return await probe_tcp(health.tcp, timeout=health.timeout)
    raise ValueError("The health config sets no probe: set exec, http or tcp.")


# exec


class _LastOutputLines:
    """The last non-blank line a probe printed on each stream."""

    def __init__(self) -> None:
        self.last: dict[Stream, str] = {}

    def feed(self, stream: Stream, lines: Sequence[str], at: float) -> None:
        for line in reversed(lines):
            if line.strip():
                self.last[stream] = _shorten(line.strip())
                return

    @property
    def detail(self) -> str:
        """The last stderr line, else the last stdout line. The two streams
        are read by separate tasks, so their relative order is not known."""
        return self.last.get(Stream.ERR) or self.last.get(Stream.OUT, "")


async def probe_exec(
    command: str, *, cwd: Path, env: Mapping[str, str], timeout: float
) -> ProbeResult:
    """Run `command` in `cwd`; healthy on exit code 0.

    The command leads its own process group, and the whole group is killed
    with SIGKILL at the timeout. When the command exits in time, whatever it
    left in its group is killed too. So children that keep the output pipes
    open neither delay the probe for long nor outlive it.
    """
    started = trio.current_time()
    output = _LastOutputLines()
    spec = ProcessSpec(command=command, cwd=cwd, env=env, setting="health.exec")
    try:
        async with open_process(
            spec, output.feed, stop_signal=signal.SIGKILL, stop_timeout=0.0
        ) as child:
            with trio.move_on_after(timeout) as scope:
                await child.wait()
    except SpawnError as error:
        return _failed(started, f"exec probe {command!r} could not start: {error}")

    status = child.exit_status
    if scope.cancelled_caught or status is None:
        return _failed(
            started,
            f"exec probe {command!r} timed out after {format_duration(timeout)} "
            "and was killed",
        )
    if status.exit_code == 0:
        return ProbeResult(ok=True, error="", duration=trio.current_time() - started)
    message = f"exec probe {command!r} failed with {status.describe()}"
    if output.detail:
        message += f": {output.detail}"
    return _failed(started, message)


# HTTP


@dataclass(frozen=True)
class HttpTarget:
    """The address an HTTP probe connects to and the request it sends."""

    url: str
    host: str
    port: int
    host_header: str
    request_target: str

    @classmethod
    def parse(cls, url: str) -> HttpTarget:
        """Split an http:// URL. Raises ValueError when it has another scheme
        or no host."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError(
                f"Invalid probe URL {url!r}: expected an http:// URL with a host."
            )
        request_target = parts.path or "/"
        if parts.query:
            request_target += f"?{parts.query}"
        return cls(
            url=url,
            host=parts.hostname,
            port=parts.port or 80,
            host_header=parts.netloc.rpartition("@")[2],
            request_target=request_target,
        )


class _HttpExchange:
    """One GET request and its response, read with h11.

    `phase` names the step in progress, so that a timeout error names the
    step where the server stalled.
    """

    def __init__(self, target: HttpTarget) -> None:
        self.target = target
        self.phase = "connecting"

    async def status(self) -> tuple[int, str]:
        """Return the response's status code and reason phrase.

        Redirects are not followed. The body is read, up to MAX_BODY_BYTES,
        so a server that stalls after the headers fails the probe.
        """
        import h11

        target = self.target
        stream = await trio.open_tcp_stream(target.host, target.port)
        async with stream:
            connection = h11.Connection(our_role=h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=target.request_target,
                headers=[
                    ("Host", target.host_header),
                    ("User-Agent", USER_AGENT),
                    ("Accept", "*/*"),
                    ("Connection", "close"),
                ],
            )
            self.phase = "sending the request"
            await stream.send_all(
                connection.send(request) + connection.send(h11.EndOfMessage())
            )
            self.phase = "waiting for the response"
            response: h11.Response | None = None
            body_bytes = 0
            while body_bytes <= MAX_BODY_BYTES:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    if not data and response is None:
                        raise _HttpFailure(
                            "the server closed the connection without a response"
                        )
                    connection.receive_data(data)
                elif isinstance(event, h11.Response):
                    response = event
                    self.phase = "reading the response body"
                elif isinstance(event, h11.Data):
                    body_bytes += len(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            assert response is not None
            reason = response.reason.decode("ascii", errors="replace")
            return response.status_code, _shorten(reason)


class _HttpFailure(Exception):
    """A failure of the HTTP exchange, worded for the probe's error."""


async def probe_http(url: str, *, timeout: float) -> ProbeResult:
    """GET `url` over plain HTTP/1.1. Healthy on a 2xx or 3xx status."""
    started = trio.current_time()
    target = HttpTarget.parse(url)
    # Imported here: only HTTP probes need it.
    import h11

    exchange = _HttpExchange(target)
    failure: str | None = None
    code = 0
    reason = ""

    with trio.move_on_after(timeout) as scope:
        try:
            code, reason = await exchange.status()
        except _HttpFailure as error:
            failure = str(error)
        except OSError as error:
            failure = (
                f"cannot connect to {target.host}:{target.port}: "
                f"{describe_connect_error(error)}"
            )
        except trio.BrokenResourceError:
            failure = "the server reset the connection"
        except h11.RemoteProtocolError as error:
            failure = f"invalid HTTP response: {error}"
        except h11.LocalProtocolError as error:
            failure = f"cannot send the request: {error}"
    if scope.cancelled_caught:
        failure = f"timed out after {format_duration(timeout)} {exchange.phase}"

    if failure is not None:
        return _failed(started, f"GET {url} failed: {failure}")
    if 200 <= code < 400:
        return ProbeResult(ok=True, error="", duration=trio.current_time() - started)
    return _failed(started, f"GET {url} returned {code} {reason}".rstrip())


# TCP


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port". Raises ValueError on a bad port."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def probe_tcp(address: str, *, timeout: float) -> ProbeResult:
    """Open a TCP connection to "host:port" and close it. Healthy when the
    connection opens within the timeout."""
    started = trio.current_time()
    host, port = split_address(address)
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as error:
            return _failed(
                started, f"connect to {address} failed: {describe_connect_error(error)}"
            )
        result = ProbeResult(ok=True, error="", duration=trio.current_time() - started)
        with trio.CancelScope(shield=True):
            await stream.aclose()
        return result
    return _failed(
        started, f"connect to {address} timed out after {format_duration(timeout)}"
    )


# Helpers


def describe_connect_error(error: OSError) -> str:
    """Word a connection error as "connection refused" and the like.

    trio's `open_tcp_stream` raises a bare OSError whose cause is an
    exception group with one error per address it tried; the first one
    names the reason.
    """
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror}"
    cause = error.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        first = cause.exceptions[0]
        if isinstance(first, OSError):
            error = first
    # trio puts the address in the strerror of each attempt; the errno
    # alone gives the reason.
    text = os.strerror(error.errno) if error.errno else str(error)
    return text[:1].lower() + text[1:]


def _failed(started: float, error: str) -> ProbeResult:
    return ProbeResult(ok=False, error=error, duration=trio.current_time() - started)


def _shorten(text: str) -> str:
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 3] + "..."
