"""Control messages: one tagged union of msgspec Structs, and their framing.

Every message carries a request `id`. A client sends one request at a time
on a connection. The daemon replies with one message carrying the same id,
or, for a stream (`events`, `logs`), pushes messages that end with
`EndReply`. An `events` stream ends only when the client closes the
connection.

On the wire a frame is a 4-byte big-endian payload length followed by the
message in MessagePack. The field `type` holds the tag. A frame longer than
`MAX_FRAME_BYTES`, a payload that does not decode, or an unknown tag is a
`ProtocolError`: the daemon answers it with an `ErrorReply` and closes that
connection.

Compatibility: a field added later gets a default, and unknown fields are
ignored, so older clients and daemons keep working with newer ones.

This module imports only msgspec and the model, so the command-line client
stays fast to start.
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import Annotated, Any

import msgspec

from supervisor.errors import ProtocolError
from supervisor.limits import MAX_HISTORY_LIMIT, MAX_RUN_ID, MAX_TAIL
from supervisor.model import Event, ProjectStatus, RunRecord, RunStatus, Stream

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Maximum payload length of one frame, header excluded."""

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size

# Numbers that reach SQLite or the log reader are bounded when a request is
# decoded, so an out-of-range value is rejected as an invalid message.
HistoryLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY_LIMIT)]
RunId = Annotated[int, msgspec.Meta(ge=1, le=MAX_RUN_ID)]
TailLines = Annotated[int, msgspec.Meta(ge=0, le=MAX_TAIL)]


class _Message(msgspec.Struct, kw_only=True, tag_field="type"):
    id: int = 0


# Requests


class StatusRequest(_Message, tag="status"):
    """State of every project, or of `name` only."""

    name: str | None = None


class TriggerRequest(_Message, tag="trigger"):
    name: str


class StartRequest(_Message, tag="start"):
    name: str


class StopRequest(_Message, tag="stop"):
    name: str


class RestartRequest(_Message, tag="restart"):
    name: str


class HistoryRequest(_Message, tag="history"):
    """Runs, newest first. `since` is inclusive."""

    name: str | None = None
    limit: HistoryLimit | None = 20
    status: RunStatus | None = None
    since: datetime | None = None


class LogsRequest(_Message, tag="logs"):
    """Log lines of a run (default: the project's current or latest run).

    With `follow`, the reply is a stream: the last `tail` lines, then live
    lines. Without `run_id` the stream follows the project across its runs
    until the client closes; with `run_id` it ends when that run ends.
    """

    name: str
    run_id: RunId | None = None
    follow: bool = False
    tail: TailLines | None = None


class ConfigShowRequest(_Message, tag="config_show"):
    """Effective settings of the active config, secrets masked."""

    name: str | None = None


class ReloadRequest(_Message, tag="reload"):
    dry_run: bool = False


class EventsRequest(_Message, tag="events"):
    """Subscribe to live events until the connection closes.

    `projects` selects projects (empty: all). `log_projects` selects whose
    log lines to send: None sends those of every selected project, and an
    empty list sends none.
    """

    projects: list[str] = []
    log_projects: list[str] | None = None


class ShutdownRequest(_Message, tag="shutdown"):
    """Stop every run and exit. The daemon acknowledges, then closes the
    connection once every run is over."""


Request = (
    StatusRequest
    | TriggerRequest
    | StartRequest
    | StopRequest
    | RestartRequest
    | HistoryRequest
    | LogsRequest
    | ConfigShowRequest
    | ReloadRequest
    | EventsRequest
    | ShutdownRequest
)


# Replies and pushed messages


class ErrorKind:
    """Values of `ErrorReply.kind`."""

    FAILED = "failed"
    UNKNOWN_PROJECT = "unknown_project"
    BAD_REQUEST = "bad_request"
    SHUTTING_DOWN = "shutting_down"
    PERMISSION_DENIED = "permission_denied"


class ErrorReply(_Message, tag="error"):
    """The request failed. `message` is a whole sentence for the user."""

    message: str
    kind: str = ErrorKind.FAILED


class ReloadState(msgspec.Struct, kw_only=True):
    """Outcome of the daemon's last reload that was not a dry run."""

    ok: bool
    at: datetime
    errors: list[str] = []


class DaemonInfo(msgspec.Struct, kw_only=True):
    pid: int
    version: str
    config_path: str
    started_at: datetime | None = None
    last_reload: ReloadState | None = None
    shutting_down: bool = False


class StatusReply(_Message, tag="status_reply"):
    projects: list[ProjectStatus]
    daemon: DaemonInfo


class ActionReply(_Message, tag="action_reply"):
    """Outcome of trigger, start, stop, restart or shutdown.

    `outcome` is a word such as "started", "skipped", "queued", "stopped".
    """

    message: str
    outcome: str = ""
    run_id: int | None = None


class HistoryReply(_Message, tag="history_reply"):
    runs: list[RunRecord]


class LogLine(msgspec.Struct, array_like=True):
    """One stored log line: time, stream, masked text."""

    at: datetime
    stream: Stream
    text: str


class LogLinesReply(_Message, tag="log_lines"):
    """A batch of stored lines of one run, oldest first, in a logs stream."""

    project: str
    run_id: int
    lines: list[LogLine]


class EventReply(_Message, tag="event"):
    """A live event pushed on an `events` or followed `logs` stream."""

    event: Event


class SkippedReply(_Message, tag="skipped"):
    """The client read too slowly and `count` events were dropped for it."""

    count: int


class EndReply(_Message, tag="end"):
    """The end of a stream."""

    message: str = ""


class ConfigReply(_Message, tag="config_reply"):
    """`settings` has the keys "runvisor", "credentials" and "projects"."""

    source: str
    settings: dict[str, Any]


class ReloadReply(_Message, tag="reload_reply"):
    """Outcome of a reload, or with `dry_run` the outcome it would have.

    `changed` projects restart, except those also listed in `updated`, which
    keep running and use their new settings from their next run.
    """

    ok: bool
    dry_run: bool = False
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    updated: list[str] = []
    unchanged: list[str] = []
    settings_changed: bool = False
    errors: list[str] = []
    warnings: list[str] = []


Reply = (
    ErrorReply
    | StatusReply
    | ActionReply
    | HistoryReply
    | LogLinesReply
    | EventReply
    | SkippedReply
    | EndReply
    | ConfigReply
    | ReloadReply
)

Message = Request | Reply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_frame(message: Message) -> bytes:
    """Encode a message as one frame, length header included.

    Raises:
        ProtocolError: the payload is longer than MAX_FRAME_BYTES.
    """
    buffer = bytearray(HEADER_BYTES)
    _encoder.encode_into(message, buffer, HEADER_BYTES)
    length = len(buffer) - HEADER_BYTES
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"A {type(message).__name__} of {length} bytes is longer than the "
            f"maximum frame size of {MAX_FRAME_BYTES} bytes."
        )
    _HEADER.pack_into(buffer, 0, length)
    return bytes(buffer)


def decode_payload(payload: bytes) -> Message:
    """Decode one frame's payload.

    Raises:
        ProtocolError: the payload is not a valid message, or its type is
            unknown (a newer peer).
    """
    try:
        message: Message = _decoder.decode(payload)
    except msgspec.ValidationError as error:
        raise ProtocolError(_describe_invalid(payload, error)) from None
    except msgspec.DecodeError as error:
        raise ProtocolError(f"The message is not valid MessagePack: {error}") from None
    except RecursionError:
        # msgspec decodes nested arrays and maps recursively.
        raise ProtocolError(
            "The message is nested too deeply to decode, so it is not a "
            "runvisor message."
        ) from None
    return message


def _describe_invalid(payload: bytes, error: msgspec.ValidationError) -> str:
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        raw = None
    tag = raw.get("type") if isinstance(raw, dict) else None
    known = {info.tag for info in _message_types()}
    if isinstance(tag, str) and tag not in known:
        return (
            f"Unknown message type {tag!r}: the peer is probably a newer "
            "runvisor. Use the same version for the daemon and the client."
        )
    return f"Invalid message: {error}"


def _message_types() -> list[Any]:
    info = msgspec.inspect.type_info(Message)
    assert isinstance(info, msgspec.inspect.UnionType)
    return list(info.types)


class FrameReader:
    """Split a byte stream into messages. Feed it bytes as they arrive.

    The length header is checked before the payload is buffered, so a peer
    that announces a huge frame costs no memory.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._length: int | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> Message | None:
        """Return the next complete message, or None until more bytes arrive.

        Raises:
            ProtocolError: the frame is oversized or does not decode. The
                stream cannot be resynchronized after that, so close it.
        """
        if self._length is None:
            if len(self._buffer) < HEADER_BYTES:
                return None
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise ProtocolError(
                    f"A frame of {length} bytes is longer than the maximum "
                    f"frame size of {self.max_frame_bytes} bytes."
                )
            self._length = length
            del self._buffer[:HEADER_BYTES]
        if len(self._buffer) < self._length:
            return None
        payload = bytes(self._buffer[: self._length])
        del self._buffer[: self._length]
        self._length = None
        return decode_payload(payload)

    def check_complete(self) -> None:
        """Check, at the end of input, that no frame was cut off.

        Raises:
            ProtocolError: the input stopped in the middle of a frame.
        """
        if self._buffer or self._length is not None:
            raise ProtocolError(
                "The connection closed in the middle of a frame "
                f"({len(self._buffer)} bytes of it received)."
            )
