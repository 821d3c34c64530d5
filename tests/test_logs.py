"""Tests of line splitting, masking, run log files and the live hub.

Benchmark note, not asserted: on a 2-core AMD EPYC virtual machine (Python
3.11.7, ext4), 100 MiB of 100-byte lines fed in 64 KiB chunks through
`LineSplitter.feed` and `RunLog.write` ran at about 320 MB/s (200 MB/s
before the splitter handed over joined text), and at about 150 MB/s with a
`Masker` of three secrets applied to every line.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from supervisor import logs
from supervisor.logs import (
    MAX_LINE_BYTES,
    Hub,
    Lines,
    LineSplitter,
    LogFile,
    Masker,
    RunLog,
    Skipped,
    delete_run_logs,
    open_log_file,
    read_run_log,
    run_log_path,
)
from supervisor.model import CompletedEvent, LogEvent, RunStatus, Stream

AT = datetime(2026, 12, 4, 17, 43, 26, 123000, tzinfo=UTC)


def feed_all(chunks: list[bytes]) -> list[str]:
    splitter = LineSplitter()
    lines: list[str] = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
    lines.extend(splitter.finish())
    return lines


def log_event(text: str, project: str = "web") -> LogEvent:
    return LogEvent(project=project, run_id=1, stream=Stream.OUT, text=text, at=AT)


def texts(records: list[logs.LogRecord], stream: Stream | None = None) -> list[str]:
    return [r.text for r in records if stream is None or r.stream is stream]


# LineSplitter


def test_splitter_joins_lines_across_reads_per_stream(tmp_path: Path) -> None:
    # The chunks one read() per write would return for this script:
    #   printf 'ab'; sleep 0.3; printf 'cd\n'
    #   printf 'out-'; echo 'err-line' >&2; sleep 0.1; echo 'rest'
    #   printf 'no-newline-at-end'
    out, err = LineSplitter(), LineSplitter()
    run_log = RunLog(tmp_path / "1.log", max_bytes=0, backups=0)
    reads = [
        (Stream.OUT, b"ab"),
        (Stream.OUT, b"cd\n"),
        (Stream.OUT, b"out-"),
        (Stream.ERR, b"err-line\n"),
        (Stream.OUT, b"rest\n"),
        (Stream.OUT, b"no-newline-at-end"),
    ]
    for stream, chunk in reads:
        splitter = out if stream is Stream.OUT else err
        run_log.write(stream, splitter.feed(chunk), 0.0)
    run_log.write(Stream.OUT, out.finish(), 0.0)
    run_log.write(Stream.ERR, err.finish(), 0.0)
    run_log.close()

    records = read_run_log(tmp_path / "1.log")
    assert texts(records, Stream.OUT) == ["abcd", "out-rest", "no-newline-at-end"]
    assert texts(records, Stream.ERR) == ["err-line"]
    assert len(records) == 4


async def test_splitter_real_child_streams_apart(tmp_path: Path) -> None:
    script = (
        "printf 'ab'; sleep 0.3; printf 'cd\\n'\n"
        "printf 'out-'; echo 'err-line' >&2; sleep 0.1; echo 'rest'\n"
        "printf 'no-newline-at-end'\n"
    )
    run_log = RunLog(tmp_path / "1.log", max_bytes=0, backups=0)
    process = await trio.lowlevel.open_process(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    async def pump(pipe: trio.abc.ReceiveStream, stream: Stream) -> None:
        splitter = LineSplitter()
        while chunk := await pipe.receive_some():
            run_log.write(stream, splitter.feed(chunk), trio.current_time())
        run_log.write(stream, splitter.finish(), trio.current_time())

    assert process.stdout is not None
    assert process.stderr is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, process.stdout, Stream.OUT)
        nursery.start_soon(pump, process.stderr, Stream.ERR)
    assert await process.wait() == 0
    run_log.close()

    records = read_run_log(tmp_path / "1.log")
    assert texts(records, Stream.OUT) == ["abcd", "out-rest", "no-newline-at-end"]
    assert texts(records, Stream.ERR) == ["err-line"]


def test_joined_lines_match_list_write(tmp_path: Path) -> None:
    # The splitter returns most reads as one joined text (`Lines`), which
    # RunLog writes without splitting. The file must match, byte for byte,
    # the file that the same lines written as a list produce.
    rng = random.Random(7)
    words = ["", "plain", "café ✓", "tab\there", "cr\rinside", "\x00nul", "x" * 300]
    data = b"".join(
        (" ".join(rng.choices(words, k=rng.randint(0, 4))) + "\n").encode()
        for _ in range(5000)
    )
    data += bytes(rng.randbytes(3000)) + b"\n"
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    joined = RunLog(tmp_path / "joined.log", max_bytes=0, backups=0)
    listed = RunLog(tmp_path / "listed.log", max_bytes=0, backups=0)
    splitter = LineSplitter()
    kinds = set()
    for chunk in chunks:
        lines = splitter.feed(chunk)
        kinds.add(type(lines))
        joined.write(Stream.OUT, lines, 0.0)
        listed.write(Stream.OUT, list(lines), 0.0)
    joined.close()
    listed.close()
    assert Lines in kinds
    assert (tmp_path / "joined.log").read_bytes() == (
        tmp_path / "listed.log"
    ).read_bytes()
    assert len(read_run_log(tmp_path / "joined.log")) == data.count(b"\n")


def test_ascii_and_decoded_reads_write_same_records(tmp_path: Path) -> None:
    # ASCII reads without NUL or CR skip decoding and are written as the
    # bytes read. Reads with a CR, a NUL or other text are decoded. Both must
    # give the records that the same lines written as a list give.
    rng = random.Random(11)
    plain = [b"plain", b"tab\tthere", b"x" * 120, b""]
    special = [b"crlf\r", b"cr\rinside", b"\x00nul", "caf\u00e9".encode()]
    chunks = []
    for index in range(400):
        words = plain + (special if index % 3 == 0 else [])
        lines = [b" ".join(rng.choices(words, k=rng.randint(0, 4))) for _ in range(30)]
        chunks.append(b"\n".join(lines) + b"\n")
    joined = RunLog(tmp_path / "joined.log", max_bytes=0, backups=0)
    listed = RunLog(tmp_path / "listed.log", max_bytes=0, backups=0)
    splitter = LineSplitter()
    paths = set()
    for chunk in chunks:
        lines = splitter.feed(chunk)
        assert isinstance(lines, Lines)
        paths.add(lines.data is not None)
        assert lines.text == chunk.replace(b"\r\n", b"\n")[:-1].decode().replace(
            "\x00", "\ufffd"
        )
        joined.write(Stream.OUT, lines, 1.5)
        listed.write(Stream.OUT, list(lines), 1.5)
    joined.close()
    listed.close()
    assert paths == {True, False}
    assert (tmp_path / "joined.log").read_bytes() == (
        tmp_path / "listed.log"
    ).read_bytes()
    assert len(read_run_log(tmp_path / "joined.log")) == 400 * 30


def test_lines_sequence_access() -> None:
    lines = Lines("a\n\nc")
    assert len(lines) == 3
    assert lines[0] == "a"
    assert lines[-1] == "c"
    assert lines[1:] == ["", "c"]
    assert list(lines) == ["a", "", "c"]
    assert lines == ["a", "", "c"]
    assert lines == Lines("a\n\nc")
    assert lines != ["a", "c"]


def test_splitter_survives_invalid_bytes() -> None:
    noise = random.Random(13).randbytes(65536) + b"\x00\x00"
    chunks = [
        b"before\n",
        b"\xff\xfe\x88 raw\n",
        b"caf\xc3",
        b"\xa9\n",
        noise[:30000],
        noise[30000:],
        b"\n",
        *[f"after {i}\n".encode() for i in range(1, 6)],
        b"done\n",
    ]
    lines = feed_all(chunks)

    assert lines[0] == "before"
    assert lines[1] == "\ufffd\ufffd\ufffd raw"
    assert lines[2] == "café"
    noise_lines = lines[3:-6]
    assert len(noise_lines) == noise.count(b"\n") + 1
    assert not any("\x00" in line for line in noise_lines)
    assert "".join(noise_lines).count("\ufffd") >= noise.count(b"\x00")
    assert lines[-6:] == ["after 1", "after 2", "after 3", "after 4", "after 5", "done"]


@pytest.mark.parametrize("cut", range(1, len("x café ✓ 𝄞\n".encode())))
def test_splitter_keeps_character_split_at_any_byte(cut: int) -> None:
    data = "x café ✓ 𝄞\n".encode()
    assert feed_all([data[:cut], data[cut:]]) == ["x café ✓ 𝄞"]


def test_splitter_replaces_nul_instead_of_dropping_it() -> None:
    assert feed_all([b"a\x00b\n"]) == ["a\ufffdb"]


def test_splitter_removes_cr_of_crlf_only() -> None:
    assert feed_all([b"one\r", b"\ntwo\r\nthree\rfour\n"]) == [
        "one",
        "two",
        "three\rfour",
    ]


def test_splitter_returns_last_line_only_on_finish() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"partial") == []
    assert splitter.finish() == ["partial"]
    assert splitter.finish() == []
    assert feed_all([b"done\r"]) == ["done"]
    assert feed_all([b"done\n\r"]) == ["done"]


def test_splitter_keeps_empty_lines() -> None:
    assert feed_all([b"\n\nx\n"]) == ["", "", "x"]


def test_splitter_cuts_long_line_at_max_bytes() -> None:
    line = b"a" * (2 * MAX_LINE_BYTES + 100)
    lines = feed_all([line[:1000], line[1000:], b"\nnext\n"])
    assert [len(piece) for piece in lines] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 100, 4]
    assert lines[-1] == "next"


def test_splitter_keeps_line_of_exactly_max_bytes() -> None:
    line = b"a" * MAX_LINE_BYTES
    assert feed_all([line + b"\n"]) == ["a" * MAX_LINE_BYTES]
    assert feed_all([line + b"\r\n"]) == ["a" * MAX_LINE_BYTES]
    # The CR of a CRLF split across reads does not count towards the limit.
    assert feed_all([line + b"\r", b"\n"]) == ["a" * MAX_LINE_BYTES]


def test_splitter_cuts_long_line_between_characters() -> None:
    # 3-byte characters: 65536 is not a multiple of 3, so a cut at exactly
    # MAX_LINE_BYTES would split a character.
    text = "€" * 30000
    lines = feed_all([text.encode() + b"\n"])
    assert "".join(lines) == text
    assert len(lines[0].encode()) == MAX_LINE_BYTES - 1
    assert all("\ufffd" not in line for line in lines)


def test_splitter_cuts_long_line_that_has_not_ended() -> None:
    splitter = LineSplitter()
    lines = splitter.feed(b"a" * (MAX_LINE_BYTES + 10))
    assert lines == ["a" * MAX_LINE_BYTES]
    assert splitter.finish() == ["a" * 10]


SECRET = "s3cr3t-v4lu3-Pq8"


@pytest.mark.parametrize("offset", [-len(SECRET) + 1, -8, -1, 0])
@pytest.mark.parametrize("ended", [True, False])
def test_cut_keeps_a_secret_whole(offset: int, ended: bool) -> None:
    # The secret starts `offset` bytes from where a plain cut would be; a
    # negative offset puts the cut inside it. Fed in small reads, so an
    # unended line is cut while its end is still unknown.
    line = b"a" * (MAX_LINE_BYTES + offset) + SECRET.encode() + b"b" * 50
    splitter = LineSplitter(keep_whole=Masker([SECRET]).values)
    pieces: list[str] = []
    data = line + b"\n" if ended else line
    for start in range(0, len(data), 1000):
        pieces.extend(splitter.feed(data[start : start + 1000]))
    pieces.extend(splitter.finish())
    assert "".join(pieces) == line.decode()
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in pieces)
    assert sum(SECRET in piece for piece in pieces) == 1
    masked = [Masker([SECRET]).mask(piece) for piece in pieces]
    assert not any(SECRET[:8] in piece or SECRET[-8:] in piece for piece in masked)


def test_cut_without_secrets_is_at_the_limit() -> None:
    line = b"a" * (MAX_LINE_BYTES - 3) + SECRET.encode() + b"\n"
    pieces = LineSplitter().feed(line)
    assert len(pieces[0]) == MAX_LINE_BYTES
    assert SECRET not in "".join(pieces[:1])


def test_cut_floor_for_self_overlapping_secret() -> None:
    # Occurrences of "aaaa" overlap all along a line of "a": moving the cut
    # before each would reach the start of the line.
    splitter = LineSplitter(keep_whole=["aaaa"])
    pieces = splitter.feed(b"a" * (MAX_LINE_BYTES * 2) + b"\n")
    assert len(pieces) >= 3
    assert all(len(piece) >= MAX_LINE_BYTES // 2 for piece in pieces[:-1])
    assert "".join(pieces) == "a" * (MAX_LINE_BYTES * 2)


@given(
    data=st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_splitter_ignores_read_sizes(data: bytes, cuts: list[int]) -> None:
    # A small limit makes random input hit the long-line path as well.
    with mock.patch.object(logs, "MAX_LINE_BYTES", 8):
        whole = feed_all([data])
        bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
        chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
        assert feed_all(chunks) == whole


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")))
def test_splitter_loses_no_text(data: bytes) -> None:
    expected = data.decode("utf-8", "replace").replace("\x00", "\ufffd")
    expected = expected.removesuffix("\n")
    assert "\n".join(feed_all([data])) == expected


# Masker


def test_masker_picks_up_later_shared_secrets() -> None:
    shared: set[str] = set()
    masker = Masker(["own-secret"], shared)
    assert masker.mask("own-secret and other-secret") == "*** and other-secret"
    shared.add("other-secret")
    assert masker.mask("own-secret and other-secret") == "*** and ***"
    assert "other-secret" in masker.values


def test_masker_replaces_every_occurrence() -> None:
    masker = Masker(["hunter22"])
    assert masker.mask("a hunter22 b hunter22") == "a *** b ***"


def test_masker_hides_all_of_overlapping_secrets() -> None:
    masker = Masker(["abcdef", "cdefgh"])
    assert masker.mask("xxabcdefghyy") == "xx***yy"


def test_masker_prefers_longest_secret() -> None:
    masker = Masker(["word", "password123"])
    assert masker.mask("password123 and word") == "*** and ***"


def test_masker_ignores_short_values() -> None:
    masker = Masker(["abc", "", "abcd"])
    assert masker.mask("abc abcd") == "abc ***"
    assert masker.ignored == 2


def test_masker_masks_lines_of_multiline_secret() -> None:
    masker = Masker(["first-line\nsecond-line"])
    assert masker.mask("second-line") == "***"


def test_masker_without_secrets_returns_text_unchanged() -> None:
    masker = Masker(["ab"])
    text = "nothing to hide"
    assert not masker
    assert masker.mask(text) is text
    assert Masker(["long-enough"])


# RunLog


def test_run_log_writes_one_record_per_line(tmp_path: Path) -> None:
    path = tmp_path / "web" / "7.log"
    run_log = RunLog(path, max_bytes=0, backups=0)
    run_log.write(Stream.OUT, ["first", "second"], AT.timestamp())
    run_log.write(Stream.ERR, ["", "with  spaces "], AT.timestamp() + 1.5)
    run_log.close()

    assert path.read_text() == (
        "2026-12-04T17:43:26.123Z out first\n"
        "2026-12-04T17:43:26.123Z out second\n"
        "2026-12-04T17:43:27.623Z err \n"
        "2026-12-04T17:43:27.623Z err with  spaces \n"
    )
    records = read_run_log(path)
    assert records[0] == logs.LogRecord(AT, Stream.OUT, "first")
    assert texts(records) == ["first", "second", "", "with  spaces "]


def test_run_log_splits_embedded_newlines(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=0, backups=0)
    run_log.write(Stream.ERR, ["spawn failed:\nrun.sh not found"], AT.timestamp())
    run_log.close()
    assert texts(read_run_log(path)) == ["spawn failed:", "run.sh not found"]


def test_run_log_file_is_private(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        run_log = RunLog(tmp_path / "new" / "1.log", max_bytes=0, backups=0)
        run_log.write(Stream.OUT, ["x"], 0.0)
        run_log.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new" / "1.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_run_log_narrows_existing_file_permissions(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_text("")
    path.chmod(0o644)
    RunLog(path, max_bytes=0, backups=0).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_run_log_rotates_and_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=300, backups=2)
    for i in range(40):
        run_log.write(Stream.OUT, [f"line {i:02d}"], 0.0)
    run_log.close()

    assert path.exists()
    assert (tmp_path / "1.log.1").exists()
    assert (tmp_path / "1.log.2").exists()
    assert not (tmp_path / "1.log.3").exists()
    for file in (path, tmp_path / "1.log.1", tmp_path / "1.log.2"):
        assert file.stat().st_size <= 300

    kept = texts(read_run_log(path))
    # Backups hold the oldest kept lines; everything older was deleted.
    assert kept == [f"line {i:02d}" for i in range(40 - len(kept), 40)]
    assert 0 < len(kept) < 40
    assert stat.S_IMODE((tmp_path / "1.log.1").stat().st_mode) == 0o600


def test_run_log_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=100, backups=0)
    for i in range(10):
        run_log.write(Stream.OUT, [f"line {i}"], 0.0)
    run_log.close()
    assert list(tmp_path.iterdir()) == [path]
    assert texts(read_run_log(path))[-1] == "line 9"


def test_read_run_log_tail_spans_backups(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=200, backups=5)
    for i in range(20):
        run_log.write(Stream.OUT, [f"line {i:02d}"], 0.0)
    run_log.close()
    current_lines = len(path.read_text().splitlines())

    tail = current_lines + 2
    assert texts(read_run_log(path, tail=tail)) == [
        f"line {i:02d}" for i in range(20 - tail, 20)
    ]
    assert read_run_log(path, tail=0) == []


def test_read_run_log_tail_of_large_file(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=0, backups=0)
    run_log.write(Stream.OUT, [f"line {i}" for i in range(20000)], 0.0)
    run_log.close()
    assert path.stat().st_size > 3 * 64 * 1024
    assert texts(read_run_log(path, tail=3)) == [
        "line 19997",
        "line 19998",
        "line 19999",
    ]
    assert len(read_run_log(path, tail=15000)) == 15000


def test_read_run_log_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_run_log(tmp_path / "missing.log") == []


def test_read_run_log_skips_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_bytes(b"2026-12-04T17:43:26.123Z out ok\n2026-12-04T17:4")
    assert texts(read_run_log(path)) == ["ok"]


class SimulatedDisk:
    """Opens log files whose writes fail with ENOSPC while `full` is set.

    This simulates a full disk with file objects; a test on a real small
    tmpfs belongs to the fault-injection suite.
    """

    def __init__(self) -> None:
        self.full = False
        self.fill_during_next_write = False

    def open(self, path: Path) -> LogFile:
        return SimulatedFile(self, open_log_file(path))


class SimulatedFile:
    def __init__(self, disk: SimulatedDisk, file: LogFile) -> None:
        self.disk = disk
        self.file = file

    def write(self, data: bytes, /) -> int | None:
        if self.disk.fill_during_next_write:
            # Like a disk filling up mid-write: the first bytes land.
            self.disk.fill_during_next_write = False
            self.disk.full = True
            return self.file.write(data[:10])
        if self.disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


def test_run_log_drops_lines_while_disk_is_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.logs")
    disk = SimulatedDisk()
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=0, backups=0, opener=disk.open)
    run_log.write(Stream.OUT, ["before"], 0.0)

    disk.full = True
    run_log.write(Stream.OUT, ["lost 1", "lost 2"], 0.0)
    run_log.write(Stream.ERR, ["lost 3"], 0.0)
    assert run_log.dropped_lines == 3

    disk.full = False
    run_log.write(Stream.OUT, ["after"], 0.0)
    run_log.close()

    assert texts(read_run_log(path)) == ["before", "after"]
    failures = [r for r in caplog.records if "Cannot write" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_run_log_notes_dropped_lines(tmp_path: Path) -> None:
    disk = SimulatedDisk()
    run_log = RunLog(tmp_path / "1.log", max_bytes=0, backups=0, opener=disk.open)
    run_log.write(Stream.OUT, ["kept"], 0.0)
    note_before = run_log.drop_note()

    disk.full = True
    run_log.write(Stream.OUT, ["lost 1"], 0.0)
    note_after_one = run_log.drop_note()
    run_log.write(Stream.ERR, ["lost 2", "lost 3"], 0.0)
    run_log.close()

    assert note_before == ""
    assert note_after_one == "1 log line dropped: No space left on device"
    assert run_log.drop_note() == "3 log lines dropped: No space left on device"


def test_run_log_ends_torn_record_after_partial_write(tmp_path: Path) -> None:
    disk = SimulatedDisk()
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=0, backups=0, opener=disk.open)
    run_log.write(Stream.OUT, ["before"], 0.0)
    disk.fill_during_next_write = True
    run_log.write(Stream.OUT, ["torn by a full disk"], 0.0)
    disk.full = False
    run_log.write(Stream.OUT, ["after"], 0.0)
    run_log.close()

    assert texts(read_run_log(path)) == ["before", "after"]
    assert run_log.dropped_lines == 1


def test_run_log_in_unwritable_folder_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    run_log = RunLog(blocker / "1.log", max_bytes=0, backups=0)
    run_log.write(Stream.OUT, ["a", "b"], 0.0)
    run_log.close()
    assert run_log.dropped_lines == 2


def test_run_log_ignores_writes_after_close(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    run_log = RunLog(path, max_bytes=0, backups=0)
    run_log.close()
    run_log.write(Stream.OUT, ["late"], 0.0)
    assert read_run_log(path) == []


def test_run_log_path_and_delete(tmp_path: Path) -> None:
    assert run_log_path(tmp_path, "web", 3) == tmp_path / "web" / "3.log"
    with pytest.raises(ValueError, match="log folder"):
        run_log_path(tmp_path, "../etc", 3)

    folder = tmp_path / "web"
    folder.mkdir()
    for name in ("1.log", "1.log.1", "1.log.2", "11.log", "2.log"):
        (folder / name).write_text("x")
    delete_run_logs(tmp_path, "web", [1, 5])
    assert sorted(p.name for p in folder.iterdir()) == ["11.log", "2.log"]


# Hub


async def test_hub_delivers_events_in_order() -> None:
    hub = Hub()
    assert not hub.has_subscribers
    with hub.subscribe() as subscription:
        assert hub.has_subscribers
        hub.publish(log_event("one"))
        hub.publish(log_event("two"))
        assert await subscription.receive() == log_event("one")
        assert await subscription.receive() == log_event("two")
    assert not hub.has_subscribers


async def test_hub_receive_waits_for_publish() -> None:
    hub = Hub()
    received: list[object] = []
    with hub.subscribe() as subscription:

        async def consume() -> None:
            received.append(await subscription.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            hub.publish(log_event("late"))
    assert received == [log_event("late")]


async def test_hub_slow_subscriber_gets_skipped_count() -> None:
    hub = Hub()
    with hub.subscribe(max_queue=3) as slow, hub.subscribe(200_000) as roomy:
        for i in range(100_000):
            hub.publish(log_event(f"line {i}"))
        assert slow.dropped == 100_000 - 3

        assert await slow.receive() == log_event("line 0")
        hub.publish(log_event("after drops"))
        assert await slow.receive() == log_event("line 1")
        assert await slow.receive() == log_event("line 2")
        assert await slow.receive() == Skipped(100_000 - 3)
        assert await slow.receive() == log_event("after drops")

        # The full queue of one subscriber costs the others nothing.
        assert roomy.dropped == 0
        assert await roomy.receive() == log_event("line 0")


async def test_hub_keeps_lifecycle_events_past_a_full_queue() -> None:
    hub = Hub()
    ended = CompletedEvent(
        project="web",
        run_id=1,
        status=RunStatus.FAILED,
        exit_code=1,
        signal=None,
        reason="exit code 1",
        at=AT,
    )
    with hub.subscribe(max_queue=2) as subscription:
        for i in range(5):
            hub.publish(log_event(f"line {i}"))
        hub.publish(ended)
        hub.publish(log_event("after the end"))
        assert subscription.dropped == 4
        assert await subscription.receive() == log_event("line 0")
        assert await subscription.receive() == log_event("line 1")
        assert await subscription.receive() == Skipped(3)
        assert await subscription.receive() == ended
        assert await subscription.receive() == Skipped(1)


async def test_hub_reports_skips_when_nothing_follows() -> None:
    hub = Hub()
    with hub.subscribe(max_queue=1) as subscription:
        hub.publish(log_event("a"))
        hub.publish(log_event("b"))
        hub.publish(log_event("c"))
        assert await subscription.receive() == log_event("a")
        assert await subscription.receive() == Skipped(2)
        with trio.move_on_after(0.05) as scope:
            await subscription.receive()
        assert scope.cancelled_caught


async def test_hub_filter_skips_other_events() -> None:
    hub = Hub()
    only_web = hub.subscribe(
        max_queue=2,
        where=lambda e: isinstance(e, LogEvent) and e.project == "web",
    )
    with only_web as subscription:
        for i in range(10):
            hub.publish(log_event(f"db {i}", project="db"))
        hub.publish(log_event("web 1"))
        assert await subscription.receive() == log_event("web 1")
        assert subscription.dropped == 0


def test_hub_rejects_empty_queue() -> None:
    with pytest.raises(ValueError, match="max_queue"), Hub().subscribe(max_queue=0):
        pass
