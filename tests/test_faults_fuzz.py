"""Fuzzing of what runvisor reads from outside: config files and frames.

- The config loader gets generated TOML documents built from the schema's
  keys with values of every type, and the example config mutated byte by
  byte. It may only raise `ConfigError` with a message per problem, and
  must finish each input within a few seconds.
- The protocol decoder gets arbitrary bytes and mutated valid frames. It
  may only raise `ProtocolError`.

RUNVISOR_FAULT_FUZZ sets the number of inputs per strategy (default 300).
"""

from __future__ import annotations

import contextlib
import re
import signal
import struct
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import tomlkit
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from supervisor.config import check_config, load_config
from supervisor.errors import ConfigError, ProtocolError
from supervisor.model import RunStatus, Stream
from supervisor.protocol import (
    MAX_FRAME_BYTES,
    ActionReply,
    EventsRequest,
    FrameReader,
    HistoryRequest,
    LogLine,
    LogLinesReply,
    LogsRequest,
    ReloadReply,
    StatusRequest,
    TriggerRequest,
    decode_payload,
    encode_frame,
)

from .fault_tools import REPOSITORY, fault_count

FUZZ_EXAMPLES = fault_count("RUNVISOR_FAULT_FUZZ", 300)
# One input may take this long at most; a hang fails at once with the input.
INPUT_SECONDS = 5.0

FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WORK_DIR = Path(tempfile.mkdtemp(prefix="runvisor-fuzz-"))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"one input took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_config_file(data: bytes) -> None:
    """Load `data` as a config file; only ConfigError may come out."""
    # Made again when missing: a temp cleaner (or a test of one) may have
    # removed the folder since this module was imported.
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    path = WORK_DIR / "runvisor.toml"
    path.write_bytes(data)
    with time_limit(INPUT_SECONDS):
        try:
            load_config(path)
        except ConfigError as error:
            assert error.problems
            assert all(problem.strip() for problem in error.problems)
        _, errors, warnings = check_config(path)
    assert all(isinstance(text, str) and text.strip() for text in errors + warnings)


# -- generated documents ------------------------------------------------------

DAEMON_KEYS = ["data_dir", "socket", "log_max_bytes", "log_backups", "history_keep"]
DAEMON_KEYS += ["log_level"]
PROJECT_KEYS = ["trigger", "path", "command", "description", "overlap", "timeout"]
PROJECT_KEYS += ["stop_signal", "stop_timeout", "keep_env_file", "env", "cron"]
PROJECT_KEYS += ["timezone", "catch_up", "jitter", "restart", "success_exit_codes"]
PROJECT_KEYS += ["start_seconds", "max_retries", "restart_limit", "restart_window"]
PROJECT_KEYS += ["backoff", "health", "name"]
BACKOFF_KEYS = ["initial", "factor", "max", "reset_after"]
HEALTH_KEYS = ["exec", "http", "tcp", "interval", "timeout", "start_period"]
HEALTH_KEYS += ["failure_threshold", "success_threshold", "on_unhealthy"]

# Words that the loader gives a meaning to, and edge values of each kind.
SPECIAL_TEXT = [
    "manual",
    "schedule",
    "always_running",
    "always",
    "on-failure",
    "never",
    "skip",
    "queue",
    "replace",
    "allow",
    "restart",
    "none",
    "auto",
    "keyring",
    "file",
    "debug",
    "SIGTERM",
    "SIGKILL",
    "TERM",
    "SIGFOO",
    "0",
    "-1s",
    "10s",
    "1h30m",
    "500ms",
    "9999999999999h",
    "1e308s",
    "nan",
    "inf",
    "10MiB",
    "1KB",
    "-5MB",
    "UTC",
    "Europe/Paris",
    "Mars/Olympus",
    "../etc",
    "/",
    "",
    " ",
    "~",
    "~nobody/x",
    "http://127.0.0.1:0/",
    "http://user@127.0.0.1:1/",
    "https://example.invalid/",
    "127.0.0.1:99999",
    "[::1]:80",
    "./run.sh",
    "'unterminated",
    "\0",
    "é",
    "\u202e",
    "x" * 5000,
]
CRONS = ["* * * * *", "0 0 31 2 *", "*/5 * * * * *", "61 * * * *", "0 0 * * MON-"]
CRONS += ["@reboot", "@hourly", "0 0 L * *", "0 0 15W * *", "0 0 1-7 * 1"]
CRONS += ["0 0 8-9 * 0#2", "0 0 29 2 1", "*/0 * * * *", "1-0 * * * *", "L L L L L"]
SPECIAL_TEXT += CRONS
NAMES = ["web", "Web", "a.b", "a..b", "..", ".", "a/b", "/abs", "", "-x", "x" * 65]
NAMES += ["RUNVISOR_X", "MY-VAR", "1ABC", "PATH", "_", "é"]

scalars = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(timezones=st.just(UTC)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["value", "credential", "x"]), inner, max_size=2
        ),
    ),
    max_leaves=6,
)
names = st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=12))


def table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.one_of(st.sampled_from(keys), st.text(max_size=8)), values, max_size=6
    )


project = st.fixed_dictionaries(
    {"trigger": st.sampled_from(["manual", "schedule", "always_running", "x"])},
    optional={
        "cron": st.one_of(st.sampled_from(CRONS), st.text(max_size=20)),
        "path": st.sampled_from(["a", "/tmp", "../x", "~", ""]),
        "backoff": table(BACKOFF_KEYS),
        "health": table(HEALTH_KEYS),
        "env": st.dictionaries(names, values, max_size=4),
    },
).flatmap(lambda base: table(PROJECT_KEYS).map(lambda extra: {**extra, **base}))

documents = st.fixed_dictionaries(
    {},
    optional={
        "runvisor": table(DAEMON_KEYS),
        "credentials": table(["backend"]),
        "projects": st.dictionaries(names, project, max_size=3),
        "extra": values,
    },
)


@FUZZ_SETTINGS
@given(documents)
def test_generated_documents_raise_only_config_errors(
    document: dict[str, Any],
) -> None:
    try:
        text = tomlkit.dumps(document)
    except (TypeError, ValueError, tomlkit.exceptions.TOMLKitError):
        assume(False)
        raise  # pragma: no cover - assume raised
    check_config_file(text.encode("utf-8", "surrogatepass"))


# -- mutated example config -----------------------------------------------------

EXAMPLE = (REPOSITORY / "config.example.toml").read_bytes()
# The example with every commented-out key switched on, so that mutations
# reach every key and not only comments.
# The health probe takes exactly one of exec, http and tcp, and the example
# sets http.
COMMENTED_KEY = re.compile(rb"# (?!exec |tcp )[A-Za-z_]+ = ")
EXAMPLE_ALL = b"\n".join(
    line[2:] if COMMENTED_KEY.match(line) else line for line in EXAMPLE.splitlines()
)


@st.composite
def mutated(draw: st.DrawFn, source: bytes) -> bytes:
    data = bytearray(source)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "copy", "cut"]))
        if kind == "delete":
            del data[position : position + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[position:position] = draw(
                st.one_of(
                    st.binary(max_size=8),
                    st.sampled_from([b"[", b"]", b'"', b"'''", b"=", b"\n", b"#"]),
                    st.sampled_from([b"[projects.x]\n", b"\xff", b"\\u0000"]),
                )
            )
        elif kind == "replace":
            data[position] = draw(st.integers(0, 255))
        elif kind == "copy":
            length = draw(st.integers(1, 200))
            data[position:position] = data[position : position + length]
        else:
            del data[position:]
    return bytes(data)


@FUZZ_SETTINGS
@given(st.one_of(mutated(EXAMPLE), mutated(EXAMPLE_ALL)))
def test_mutated_example_config_raises_only_config_errors(data: bytes) -> None:
    check_config_file(data)


def test_example_with_every_key_is_valid() -> None:
    # The mutations start from valid files, or they would test little.
    for data in (EXAMPLE, EXAMPLE_ALL):
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        path = WORK_DIR / "example.toml"
        path.write_bytes(data)
        load_config(path)


# -- protocol frames --------------------------------------------------------------

SAMPLE_MESSAGES = [
    StatusRequest(id=1),
    TriggerRequest(id=2, name="web"),
    HistoryRequest(id=3, name="web", limit=5, status=RunStatus.FAILED),
    LogsRequest(id=4, name="web", run_id=7, follow=True, tail=10),
    EventsRequest(id=5, projects=["web"], log_projects=[]),
    ActionReply(id=6, message="Started run 3.", outcome="started", run_id=3),
    ReloadReply(id=7, ok=False, errors=["runvisor.toml:3: bad"]),
    LogLinesReply(
        id=8,
        project="web",
        run_id=3,
        lines=[LogLine(datetime(2026, 1, 5, tzinfo=UTC), Stream.OUT, "hello")],
    ),
]
VALID_PAYLOADS = [encode_frame(message)[4:] for message in SAMPLE_MESSAGES]


def decode_cleanly(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_payload(payload)


@FUZZ_SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_payloads_raise_only_protocol_errors(payload: bytes) -> None:
    decode_cleanly(payload)


@FUZZ_SETTINGS
@given(st.sampled_from(VALID_PAYLOADS).flatmap(mutated))
def test_mutated_payloads_raise_only_protocol_errors(payload: bytes) -> None:
    decode_cleanly(payload)


@FUZZ_SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 1 << 20))
def test_frame_reader_raises_only_protocol_errors(
    chunks: list[bytes], max_frame: int
) -> None:
    reader = FrameReader(max_frame_bytes=max_frame)
    with contextlib.suppress(ProtocolError):
        for chunk in chunks:
            reader.feed(chunk)
            while reader.next_message() is not None:
                pass
        reader.check_complete()


def test_deeply_nested_payloads_are_protocol_errors() -> None:
    # Arrays nested 100,000 deep: msgspec recurses once per level, in an
    # unknown field (skipped by the typed decoder) and at the top level
    # (decoded again to describe the error).
    nested = b"\x91" * 100_000 + b"\xc0"
    in_field = msgspec.msgpack.encode({"type": "status", "extra": None})[:-1] + nested
    try:
        decode_payload(in_field)
    except ProtocolError as error:
        assert "nested too deeply" in str(error)
    else:  # pragma: no cover - a failure path
        raise AssertionError("a nested payload decoded")
    try:
        decode_payload(nested)
    except ProtocolError as error:
        assert "Invalid message" in str(error)
    else:  # pragma: no cover - a failure path
        raise AssertionError("a nested payload decoded")


def test_oversized_frame_header_is_rejected_before_buffering() -> None:
    reader = FrameReader()
    reader.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    try:
        reader.next_message()
    except ProtocolError as error:
        assert str(MAX_FRAME_BYTES) in str(error)
    else:  # pragma: no cover - a failure path
        raise AssertionError("an oversized frame was accepted")
    # Only the header was buffered.
    assert reader.pending <= 4
