"""Control messages: round trips of every type, and broken frames."""

from __future__ import annotations

import re
import struct
import typing
from datetime import UTC, datetime

import msgspec
import pytest

from supervisor.errors import ProtocolError
from supervisor.model import (
    CompletedEvent,
    Health,
    HealthEvent,
    LogEvent,
    ProjectState,
    ProjectStatus,
    ReloadEvent,
    RunRecord,
    RunStatus,
    RunTrigger,
    StartedEvent,
    StateEvent,
    Stream,
    TriggerMode,
)
from supervisor.protocol import (
    MAX_FRAME_BYTES,
    ActionReply,
    ConfigReply,
    ConfigShowRequest,
    DaemonInfo,
    EndReply,
    ErrorReply,
    EventReply,
    EventsRequest,
    FrameReader,
    HistoryReply,
    HistoryRequest,
    LogLine,
    LogLinesReply,
    LogsRequest,
    Message,
    ReloadReply,
    ReloadRequest,
    ReloadState,
    RestartRequest,
    ShutdownRequest,
    SkippedReply,
    StartRequest,
    StatusReply,
    StatusRequest,
    StopRequest,
    TriggerRequest,
    decode_payload,
    encode_frame,
)

AT = datetime(2026, 1, 5, 12, 30, 15, 123456, tzinfo=UTC)

RUN = RunRecord(
    id=7,
    project="web",
    trigger=RunTrigger.RESTART,
    status=RunStatus.FAILED,
    started_at=AT,
    ended_at=AT,
    pid=4242,
    exit_code=3,
    reason="exit code 3",
    fire_time=None,
)

EVENTS = [
    StartedEvent(project="web", run_id=7, trigger=RunTrigger.STARTUP, pid=1, at=AT),
    CompletedEvent(
        project="web",
        run_id=7,
        status=RunStatus.STOPPED,
        exit_code=None,
        signal=15,
        reason="stopped by user",
        at=AT,
    ),
    LogEvent(project="web", run_id=7, stream=Stream.ERR, text="boom ✓", at=AT),
    StateEvent(
        project="web",
        old=ProjectState.RUNNING,
        new=ProjectState.BACKOFF,
        reason="restarting in 1s",
        at=AT,
    ),
    HealthEvent(
        project="web",
        run_id=7,
        old=Health.UNKNOWN,
        new=Health.UNHEALTHY,
        reason="timed out",
        at=AT,
    ),
    ReloadEvent(
        ok=True,
        added=["d"],
        removed=[],
        changed=["a"],
        unchanged=["b", "c"],
        error="",
        at=AT,
    ),
]

MESSAGES: list[Message] = [
    StatusRequest(id=1),
    StatusRequest(id=2, name="web"),
    TriggerRequest(id=3, name="job"),
    StartRequest(id=4, name="web"),
    StopRequest(id=5, name="web"),
    RestartRequest(id=6, name="web"),
    HistoryRequest(id=7, name="web", limit=5, status=RunStatus.FAILED, since=AT),
    LogsRequest(id=8, name="web", run_id=7, follow=True, tail=10),
    ConfigShowRequest(id=9, name="web"),
    ReloadRequest(id=10, dry_run=True),
    EventsRequest(id=11, projects=["web"], log_projects=[]),
    ShutdownRequest(id=12),
    ErrorReply(
        id=13, message="Project 'x' is not in the config.", kind="unknown_project"
    ),
    StatusReply(
        id=14,
        projects=[
            ProjectStatus(
                name="web",
                trigger=TriggerMode.ALWAYS_RUNNING,
                state=ProjectState.RUNNING,
                health=Health.HEALTHY,
                pid=4242,
                run_id=7,
                started_at=AT,
                restarts=2,
                last_run=RUN,
                next_fire=None,
            )
        ],
        daemon=DaemonInfo(
            pid=99,
            version="0.1.0",
            config_path="/etc/runvisor.toml",
            started_at=AT,
            last_reload=ReloadState(ok=False, at=AT, errors=["x.toml:3: bad"]),
        ),
    ),
    ActionReply(id=15, message="Started run 8 of 'job'.", outcome="started", run_id=8),
    HistoryReply(id=16, runs=[RUN]),
    LogLinesReply(
        id=17,
        project="web",
        run_id=7,
        lines=[LogLine(AT, Stream.OUT, "one"), LogLine(AT, Stream.ERR, "")],
    ),
    *[EventReply(id=18, event=event) for event in EVENTS],
    SkippedReply(id=19, count=12),
    EndReply(id=20, message="Run 7 has ended."),
    ConfigReply(
        id=21,
        source="/etc/runvisor.toml",
        settings={"projects": {"web": {"restart": "always", "env": {"K": "***"}}}},
    ),
    ReloadReply(
        id=22,
        ok=True,
        dry_run=True,
        added=["d"],
        changed=["a", "b"],
        updated=["b"],
        unchanged=["c"],
    ),
]


def test_every_message_type_is_covered() -> None:
    union = typing.get_args(Message)
    covered = {type(message) for message in MESSAGES}
    assert covered == set(union)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message: Message) -> None:
    reader = FrameReader()
    reader.feed(encode_frame(message))
    assert reader.next_message() == message
    assert reader.next_message() is None
    reader.check_complete()


def test_frames_split_at_every_byte() -> None:
    data = b"".join(encode_frame(message) for message in MESSAGES)
    reader = FrameReader()
    received = []
    for index in range(len(data)):
        reader.feed(data[index : index + 1])
        while (message := reader.next_message()) is not None:
            received.append(message)
    assert received == MESSAGES


def test_frame_header_is_big_endian_length() -> None:
    frame = encode_frame(StatusRequest(id=1))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgspec.msgpack.decode(frame[4:]) == {
        "type": "status",
        "id": 1,
        "name": None,
    }


def test_unknown_tag_names_the_type() -> None:
    payload = msgspec.msgpack.encode({"type": "teleport", "id": 3})
    with pytest.raises(ProtocolError, match="Unknown message type 'teleport'"):
        decode_payload(payload)


def test_missing_field_is_invalid() -> None:
    payload = msgspec.msgpack.encode({"type": "trigger", "id": 3})
    with pytest.raises(ProtocolError, match="missing required field `name`"):
        decode_payload(payload)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "history", "limit": 0}, "Expected `int` >= 1 - at `$.limit`"),
        ({"type": "history", "limit": 2**64 - 1}, "<= 1000000 - at `$.limit`"),
        ({"type": "logs", "name": "x", "run_id": 0}, ">= 1 - at `$.run_id`"),
        ({"type": "logs", "name": "x", "run_id": 2**63}, "at `$.run_id`"),
        ({"type": "logs", "name": "x", "tail": -1}, ">= 0 - at `$.tail`"),
    ],
)
def test_out_of_range_numbers_are_invalid(
    fields: dict[str, object], message: str
) -> None:
    payload = msgspec.msgpack.encode({"id": 3, **fields})
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_payload(payload)


def test_malformed_payload_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="not valid MessagePack"):
        decode_payload(b"\xc1\x00")


def test_unknown_fields_are_ignored() -> None:
    # A newer client may send fields this version does not know.
    payload = msgspec.msgpack.encode(
        {"type": "status", "id": 4, "name": "web", "verbosity": 3}
    )
    assert decode_payload(payload) == StatusRequest(id=4, name="web")


def test_missing_new_fields_take_defaults() -> None:
    # An older client sends only the fields it knew.
    payload = msgspec.msgpack.encode({"type": "logs", "id": 5, "name": "web"})
    assert decode_payload(payload) == LogsRequest(
        id=5, name="web", run_id=None, follow=False, tail=None
    )


def test_oversized_frame_is_rejected_from_its_header() -> None:
    reader = FrameReader()
    reader.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ProtocolError, match="longer than the maximum frame size"):
        reader.next_message()


def test_frame_limit_is_inclusive() -> None:
    message = EndReply(id=1, message="x" * 20)
    frame = encode_frame(message)
    payload_length = len(frame) - 4

    at_limit = FrameReader(max_frame_bytes=payload_length)
    at_limit.feed(frame)
    assert at_limit.next_message() == message

    below = FrameReader(max_frame_bytes=payload_length - 1)
    below.feed(frame)
    with pytest.raises(ProtocolError, match="longer than the maximum"):
        below.next_message()


def test_encoding_an_oversized_message_fails() -> None:
    huge = LogLinesReply(
        id=1,
        project="web",
        run_id=1,
        lines=[LogLine(AT, Stream.OUT, "x" * (MAX_FRAME_BYTES // 4))] * 5,
    )
    with pytest.raises(ProtocolError, match="longer than the maximum frame size"):
        encode_frame(huge)


def test_truncated_frame_is_reported_at_end_of_input() -> None:
    frame = encode_frame(StatusRequest(id=1, name="web"))
    reader = FrameReader()
    reader.feed(frame[:-2])
    assert reader.next_message() is None
    with pytest.raises(ProtocolError, match="closed in the middle of a frame"):
        reader.check_complete()


def test_truncated_header_is_reported_at_end_of_input() -> None:
    reader = FrameReader()
    reader.feed(b"\x00\x00")
    assert reader.next_message() is None
    with pytest.raises(ProtocolError, match="middle of a frame"):
        reader.check_complete()


def test_empty_input_is_complete() -> None:
    FrameReader().check_complete()
