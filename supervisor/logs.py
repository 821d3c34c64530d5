"""Output of runs: line splitting, secret masking, log files and live fan-out.

The path of one output line through the daemon:

1. The process pump reads a chunk from a run's stdout or stderr pipe and
   feeds it to that stream's `LineSplitter`, which returns complete lines
   only. Each stream has its own splitter, so text of stdout and stderr is
   never joined into one line.
2. The runner masks the lines with the run's `Masker`.
3. `RunLog.write` appends them to the run's log file with one timestamp for
   the whole chunk, because formatting a timestamp per line costs several
   times the pipe's throughput in Python.
4. If anyone is following, the runner publishes them to the `Hub`, which
   never blocks. A subscriber that falls behind loses events and then
   receives a `Skipped` with the number lost.

A log file holds one record per line: "2026-12-04T17:43:26.123Z out text".
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Protocol, overload

import msgspec
import trio

from .model import Event, LogEvent, Stream

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
"""Maximum line length in bytes, newline excluded. Longer lines are split."""

_TAIL_BLOCK_BYTES = 64 * 1024


# Line splitting


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    # NUL is valid UTF-8 but breaks terminals and C-string consumers of the
    # log, so it is replaced like an invalid byte rather than dropped.
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text


class Lines(Sequence[str]):
    """Complete lines kept as one text, joined by LF without a last LF, and
    split into a list only when something reads them one by one.

    A 64 KiB read of a block-buffered writer holds some 650 lines. Writing
    them to the log with one `str.replace` of the joined text costs a
    fraction of splitting them into 650 strings and joining them again,
    which was most of the daemon's CPU time under heavy output.

    Lines made `from_ascii` also keep the bytes they were read as, so the log
    writes them without decoding and encoding them again. Their `text` is
    decoded on first use.
    """

    __slots__ = ("_count", "_split", "_text", "data")

    def __init__(self, text: str) -> None:
        self._text: str | None = text
        self.data: bytes | None = None
        """The lines as ASCII bytes, when made with `from_ascii`."""
        self._count = text.count("\n") + 1
        self._split: list[str] | None = None

    @classmethod
    def from_ascii(cls, data: bytes) -> Lines:
        """Lines from ASCII bytes without NUL or CR, which are their own
        UTF-8 encoding and need no replacement."""
        lines = cls.__new__(cls)
        lines._text = None
        lines.data = data
        lines._count = data.count(b"\n") + 1
        lines._split = None
        return lines

    @property
    def text(self) -> str:
        if self._text is None:
            assert self.data is not None
            self._text = self.data.decode("ascii")
        return self._text

    def _lines(self) -> list[str]:
        if self._split is None:
            self._split = self.text.split("\n")
        return self._split

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self._lines()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lines):
            return self.text == other.text
        if isinstance(other, list):
            return self._lines() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Lines({self._lines()!r})"


def _character_boundary(data: bytes | bytearray, limit: int) -> int:
    """Return a cut position at or up to 3 bytes before `limit` that does not
    fall inside a UTF-8 character."""
    cut = limit
    while cut > limit - 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


class LineSplitter:
    """Split one stream's output into lines.

    Bytes are kept until their newline arrives, so a line or a multi-byte
    character cut across reads comes out whole. A line longer than
    MAX_LINE_BYTES bytes of input is cut into pieces of at most that size,
    at a character boundary, and before any of the `keep_whole` texts that
    would straddle the cut. Output is masked piece by piece, so a secret cut
    in two would be masked in neither piece. Invalid UTF-8 and NUL bytes
    become U+FFFD. A CR before the LF is removed.
    """

    def __init__(self, keep_whole: Iterable[str] = ()) -> None:
        self._pending = b""
        # Texts longer than half a piece could move a cut too far back; a
        # secret that long is masked within a piece only.
        self._keep_whole = sorted(
            {
                data
                for data in (text.encode() for text in keep_whole)
                if 1 < len(data) <= MAX_LINE_BYTES // 2
            },
            key=len,
        )
        # How many bytes past a cut must be known before cutting there.
        self._reach = max((len(data) for data in self._keep_whole), default=1) - 1

    def feed(self, data: bytes | bytearray) -> Sequence[str]:
        """Add bytes read from the stream and return the lines they complete."""
        buffer = self._pending + data if self._pending else bytes(data)
        end = buffer.rfind(b"\n")
        if end < 0:
            self._pending = buffer
            return self._cut_overlong_pending()

        self._pending = buffer[end + 1 :]
        lines = self._split_complete(buffer[:end])
        overlong = self._cut_overlong_pending()
        if overlong:
            return [*lines, *overlong]
        return lines

    def finish(self) -> list[str]:
        """Return the last line when the stream ended without a newline."""
        pending, self._pending = self._pending, b""
        if not pending:
            return []
        if pending.endswith(b"\r"):
            pending = pending[:-1]
        return [_decode(pending)] if pending else []

    def _split_complete(self, body: bytes) -> Sequence[str]:
        # `body` is every complete line joined by LF, without the last LF.
        # A one-byte search is several times faster than the two-byte one.
        has_cr = b"\r" in body
        if has_cr:
            body = body.replace(b"\r\n", b"\n")
            if body.endswith(b"\r"):
                body = body[:-1]
        if len(body) <= MAX_LINE_BYTES:
            # No line can be too long: leave the text whole. ASCII without NUL
            # or CR (most output) needs no decoding; otherwise decode once,
            # where "replace" maps every LF byte to one "\n".
            if not has_cr and body.isascii() and b"\x00" not in body:
                return Lines.from_ascii(body)
            return Lines(_decode(body))

        lines: list[str] = []
        for part in body.split(b"\n"):
            while len(part) > MAX_LINE_BYTES:
                cut = self._cut(part)
                lines.append(_decode(part[:cut]))
                part = part[cut:]
            lines.append(_decode(part))
        return lines

    def _cut_overlong_pending(self) -> list[str]:
        lines: list[str] = []
        # A CR at the end may be the first half of a CRLF, which does not
        # count towards the line's length, so it never forces a cut. The
        # bytes just past the cut must be known, to see what straddles it.
        while (
            len(self._pending) - self._pending.endswith(b"\r")
            > MAX_LINE_BYTES + self._reach
        ):
            cut = self._cut(self._pending)
            lines.append(_decode(self._pending[:cut]))
            self._pending = self._pending[cut:]
        return lines

    def _cut(self, data: bytes) -> int:
        """Return where to cut the overlong line at the start of `data`: at
        most MAX_LINE_BYTES in, between characters, and before each
        `keep_whole` text that would straddle the cut."""
        cut = _character_boundary(data, MAX_LINE_BYTES)
        # A text that overlaps itself ("abab") can chain occurrences far
        # back; the floor keeps pieces at least half full.
        floor = MAX_LINE_BYTES // 2
        moved = True
        while moved:
            moved = False
            for text in self._keep_whole:
                # An occurrence inside this window starts before `cut` and
                # ends after it.
                start = data.find(text, cut - len(text) + 1, cut + len(text) - 1)
                if start >= floor:
                    cut = start
                    moved = True
        return cut


# Masking


class Masker:
    """Replace known secret values in text with "***".

    A secret that spans several lines is also matched line by line, because
    output is masked one line at a time. Occurrences that overlap, such as
    two secrets sharing a middle part, are replaced as one span, so no piece
    of either one is left visible.

    `shared` is a set that other code may add secrets to later, such as the
    secrets that other runs wrote into the same folder's `.env.local`. The
    masker replaces those too, from the first `mask` call after they were
    added.
    """

    MIN_SECRET_LENGTH = 4
    """Shorter values are not masked, since they would hide ordinary text."""

    def __init__(self, secrets: Iterable[str], shared: Set[str] | None = None) -> None:
        self._own = tuple(secrets)
        self._shared = shared
        self._shared_seen = 0
        self.ignored = 0
        """Number of own values skipped for being shorter than MIN_SECRET_LENGTH."""
        self._secrets = self._collect()

    def _collect(self) -> list[str]:
        values: set[str] = set()
        self.ignored = 0
        shared = tuple(self._shared) if self._shared is not None else ()
        self._shared_seen = len(shared)
        for secret in (*self._own, *shared):
            candidates = [secret]
            if "\n" in secret or "\r" in secret:
                candidates.extend(secret.splitlines())
            for candidate in candidates:
                if len(candidate) >= self.MIN_SECRET_LENGTH:
                    values.add(candidate)
                elif candidate is secret and secret in self._own:
                    self.ignored += 1
        return sorted(values, key=len, reverse=True)

    def _refresh(self) -> None:
        # The shared set only grows, so a new size means new secrets.
        if self._shared is not None and len(self._shared) != self._shared_seen:
            self._secrets = self._collect()

    def __bool__(self) -> bool:
        self._refresh()
        return bool(self._secrets)

    @property
    def values(self) -> tuple[str, ...]:
        """The texts that `mask` replaces, longest first."""
        self._refresh()
        return tuple(self._secrets)

    def mask(self, text: str) -> str:
        self._refresh()
        if not self._secrets:
            return text
        spans: list[tuple[int, int]] = []
        for secret in self._secrets:
            start = text.find(secret)
            while start >= 0:
                spans.append((start, start + len(secret)))
                start = text.find(secret, start + 1)
        if not spans:
            return text

        spans.sort()
        pieces: list[str] = []
        position = 0
        span_start, span_end = spans[0]
        for start, end in spans[1:]:
            if start <= span_end:
                span_end = max(span_end, end)
                continue
            pieces.append(text[position:span_start])
            pieces.append("***")
            position = span_end
            span_start, span_end = start, end
        pieces.append(text[position:span_start])
        pieces.append("***")
        pieces.append(text[span_end:])
        return "".join(pieces)


# Log files


class LogFile(Protocol):
    """The part of a binary file object that RunLog uses."""

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...


def open_log_file(path: Path) -> LogFile:
    """Open a log file for appending, created with mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        # A file left by an older version may have wider permissions.
        os.fchmod(fd, 0o600)
        return open(fd, "ab", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def run_log_path(logs_dir: Path, project: str, run_id: int) -> Path:
    if project in ("", ".", "..") or "/" in project or "\0" in project:
        raise ValueError(f"{project!r} cannot be used as a log folder name.")
    return logs_dir / project / f"{run_id}.log"


def _backup_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def _existing_backups(path: Path) -> list[Path]:
    """Return the rotated backups of a log file, oldest (highest index) first."""
    indexes: list[int] = []
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and suffix.isdigit():
            indexes.append(int(suffix))
    return [_backup_path(path, index) for index in sorted(indexes, reverse=True)]


class RunLog:
    """The log file of one run, rotated by size.

    When the file grows past `max_bytes` it is renamed to PATH.1, older
    backups move up by one, and the one past `backups` is deleted.
    `max_bytes` of 0 turns rotation off. `backups` of 0 truncates instead.
    `write` and `close` never raise OSError. While the disk is full or the
    file cannot be opened, lines are dropped and counted, and the first
    failure of the run is logged.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backups: int,
        opener: Callable[[Path], LogFile] = open_log_file,
        open_now: bool = True,
    ) -> None:
        self.path = path
        self.dropped_lines = 0
        """Output lines not written because of write errors."""
        self.drop_error = ""
        """The error of the first write that dropped lines, such as "No space
        left on device"."""
        self._max_bytes = max_bytes
        self._backups = backups
        self._opener = opener
        self._file: LogFile | None = None
        self._size = 0
        self._closed = False
        self._failure_logged = False
        self._recovery_logged = False
        self._torn = False
        self._cached_second = -1
        self._cached_prefix = ""
        if open_now:
            self.open()

    def open(self) -> None:
        """Create the folder and open the file, unless that is done already.

        A failure is recorded like a failed write; the first write tries
        again. `open_now=False` leaves this to the caller, who may call it
        from a worker thread before any write.
        """
        if self._file is not None or self._closed:
            return
        try:
            self._open()
        except OSError as exc:
            self._record_failure(exc, 0)

    def write(self, stream: Stream, lines: Sequence[str], at: float) -> None:
        """Append lines read at `at` (seconds since the epoch) from a stream."""
        if not lines or self._closed:
            return
        prefix = f"{self._format_time(at)} {stream} "
        if isinstance(lines, Lines):
            # One record per line by construction: the text contains exactly
            # len(lines) - 1 line breaks.
            if lines.data is not None:
                head = prefix.encode()
                data = head + lines.data.replace(b"\n", b"\n" + head) + b"\n"
            else:
                text = prefix + lines.text.replace("\n", "\n" + prefix) + "\n"
                data = text.encode("utf-8", "replace")
        else:
            text = prefix + ("\n" + prefix).join(lines) + "\n"
            if text.count("\n") != len(lines):
                # A caller passed text with line breaks: give each line its
                # own record so the file stays one record per line.
                lines = "\n".join(lines).split("\n")
                text = prefix + ("\n" + prefix).join(lines) + "\n"
            data = text.encode("utf-8", "replace")

        try:
            if self._file is None:
                self._open()
            if 0 < self._max_bytes < self._size + len(data) and self._size > 0:
                self._rotate()
            if self._torn:
                # The last failed write left half a record: end it first.
                self._write_all(b"\n")
                self._torn = False
            self._write_all(data)
        except OSError as exc:
            self._record_failure(exc, len(lines))
            return

        if self.dropped_lines and not self._recovery_logged:
            self._recovery_logged = True
            logger.info(
                "Writing the log file %s works again, after dropping %d output lines",
                self.path,
                self.dropped_lines,
            )

    def drop_note(self) -> str:
        """Describe the dropped lines for the run's history, or return ""."""
        if not self.dropped_lines:
            return ""
        lines = "line" if self.dropped_lines == 1 else "lines"
        return f"{self.dropped_lines} log {lines} dropped: {self.drop_error}"

    def close(self) -> None:
        self._closed = True
        self._close_file()
        if self.dropped_lines:
            logger.warning(
                "%d output lines of the run were not written to %s",
                self.dropped_lines,
                self.path,
            )

    def _format_time(self, at: float) -> str:
        millis = int(at * 1000)
        second, milli = divmod(millis, 1000)
        if second != self._cached_second:
            self._cached_prefix = time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(second)
            )
            self._cached_second = second
        return f"{self._cached_prefix}.{milli:03d}Z"

    def _open(self) -> None:
        try:
            self._file = self._opener(self.path)
        except FileNotFoundError:
            # The project's first run, or its folder was removed meanwhile.
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._file = self._opener(self.path)
        try:
            self._size = os.stat(self.path).st_size
        except OSError:
            self._size = 0

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self._record_failure(exc, 0)

    def _rotate(self) -> None:
        self._close_file()
        if self._backups > 0:
            for index in range(self._backups - 1, 0, -1):
                source = _backup_path(self.path, index)
                if source.exists():
                    os.replace(source, _backup_path(self.path, index + 1))
            os.replace(self.path, _backup_path(self.path, 1))
        else:
            os.unlink(self.path)
        # A record torn by a failed write stays at the end of the old file.
        self._torn = False
        self._open()

    def _write_all(self, data: bytes) -> None:
        assert self._file is not None
        written = 0
        try:
            while written < len(data):
                count = self._file.write(data[written:] if written else data)
                if not count:
                    raise OSError(errno.EIO, f"Short write to {self.path}")
                written += count
        except OSError:
            if written:
                self._torn = True
            # Reopen on the next write: the size on disk is unknown now.
            self._close_file()
            raise
        finally:
            self._size += written

    def _record_failure(self, exc: OSError, lines: int) -> None:
        self.dropped_lines += lines
        if lines and not self.drop_error:
            self.drop_error = exc.strerror or str(exc)
        if self._failure_logged:
            return
        self._failure_logged = True
        logger.warning(
            "Cannot write the log file %s, so output lines are dropped until a "
            "write works again: %s",
            self.path,
            exc,
        )


# Reading and deleting logs


class LogRecord(msgspec.Struct, frozen=True):
    """One line of a run's log file."""

    at: datetime
    stream: Stream
    text: str


def _parse_record(line: bytes) -> LogRecord | None:
    parts = line.decode("utf-8", "replace").split(" ", 2)
    if len(parts) != 3:
        return None
    stamp, stream, text = parts
    try:
        return LogRecord(datetime.fromisoformat(stamp), Stream(stream), text)
    except ValueError:
        return None


def _read_lines(path: Path, last: int | None) -> list[bytes]:
    """Return the lines of a file, or only its `last` lines, reading backwards
    in blocks so that a tail of a large file does not read all of it."""
    try:
        with open(path, "rb") as file:
            if last is None:
                data = file.read()
                position = 0
            else:
                position = file.seek(0, os.SEEK_END)
                data = b""
                while position > 0 and data.count(b"\n") <= last:
                    step = min(_TAIL_BLOCK_BYTES, position)
                    position -= step
                    file.seek(position)
                    data = file.read(step) + data
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if position > 0:
        lines = lines[1:]  # the first line was cut by the block boundary
    if last is not None:
        lines = lines[-last:] if last else []
    return lines


def read_run_log(path: Path, tail: int | None = None) -> list[LogRecord]:
    """Read a run's log records, rotated backups first, oldest to newest.

    With `tail`, only the last `tail` records are returned. Lines that do not
    parse as records (a line torn by a crash) are skipped. A run without a
    log file has no records.
    """
    files = [*_existing_backups(path), path]
    raw: list[bytes] = []
    for file in reversed(files):
        wanted = None if tail is None else tail - len(raw)
        if wanted == 0:
            break
        raw = _read_lines(file, wanted) + raw
    records = [_parse_record(line) for line in raw]
    return [record for record in records if record is not None]


def delete_run_logs(logs_dir: Path, project: str, run_ids: Iterable[int]) -> None:
    """Delete the log files of runs, backups included.

    Missing files are skipped. Other errors are logged, not raised, so that
    retention goes on with the next file.
    """
    for run_id in run_ids:
        path = run_log_path(logs_dir, project, run_id)
        for file in [path, *_existing_backups(path)]:
            try:
                file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("Cannot delete the log file %s: %s", file, exc)


# Live fan-out


class Skipped(msgspec.Struct, tag="skipped", frozen=True):
    """Number of events a subscriber lost because its queue was full."""

    count: int


class Subscription:
    """A subscriber's bounded queue of events.

    When the queue is full, log lines are dropped first: lifecycle events
    (state, started, completed, health, reload) still get up to `max_queue`
    more places, because a follower that misses a run's end cannot tell
    that it ended.
    """

    def __init__(self, max_queue: int, where: Callable[[Event], bool] | None) -> None:
        self.max_queue = max_queue
        self.dropped = 0
        """Events dropped because the queue was full, over the subscription."""
        self._where = where
        self._items: deque[Event | Skipped] = deque()
        self._skipped = 0
        self._waiters = trio.lowlevel.ParkingLot()

    async def receive(self) -> Event | Skipped:
        """Wait for the next event.

        After drops, a `Skipped` with their count comes first, in the place of
        the events that it replaces.
        """
        while not self._items and not self._skipped:
            await self._waiters.park()
        await trio.lowlevel.checkpoint()
        if self._items:
            return self._items.popleft()
        skipped, self._skipped = self._skipped, 0
        return Skipped(skipped)

    def _offer(self, event: Event) -> None:
        if self._where is not None and not self._where(event):
            return
        room = self.max_queue
        if not isinstance(event, LogEvent):
            room *= 2
        if len(self._items) >= room:
            self._skipped += 1
            self.dropped += 1
            return
        if self._skipped:
            self._items.append(Skipped(self._skipped))
            self._skipped = 0
        self._items.append(event)
        self._waiters.unpark_all()


class Hub:
    """Live fan-out of events to subscribers. Use from the trio thread only."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    def publish(self, event: Event) -> None:
        """Queue the event for every subscriber. Never blocks."""
        for subscription in self._subscriptions:
            subscription._offer(event)

    @contextmanager
    def subscribe(
        self,
        max_queue: int = 1024,
        *,
        where: Callable[[Event], bool] | None = None,
    ) -> Iterator[Subscription]:
        """Subscribe for the duration of the `with` block.

        `where` selects the events to queue (for example one project's logs),
        so other events neither fill the queue nor count as skipped. It runs
        inside `publish` and must not raise.
        """
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}.")
        subscription = Subscription(max_queue, where)
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)
