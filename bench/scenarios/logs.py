"""Log throughput: one child writes many numbered lines; the peer must store all."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

from bench import procs
from bench.peers.base import BENCH_DIR, Peer, Settings, read_starts
from bench.scenarios.common import Metrics, session, wait_all_started

TITLE = "logs"
MEASURES = (
    "One child writes N lines of 100 bytes, block-buffered (`block_`) and "
    "with one write per line (`line_`). `s`: from releasing the child until "
    "the log holds N lines; `lost`: sequence numbers missing from the log, "
    "the last line included; `garbled`: lines that are not one whole written "
    "line; `cpu_s`: the daemon's CPU seconds meanwhile; `peak_rss_mib`: its "
    "lifetime peak RSS (VmHWM); `rss_over_idle_mib`: that peak minus its RSS "
    "just before the child was released."
)

WRITER = BENCH_DIR / "writer.py"
LINE_BYTES = 100


class LineCounter:
    """Counts newlines in a peer's log files as they grow."""

    def __init__(self, peer: Peer, project: str) -> None:
        self.peer = peer
        self.project = project
        self.offsets: dict[Path, int] = {}
        self.lines = 0

    def poll(self) -> int:
        for path in self.peer.log_files(self.project):
            offset = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            self.lines += chunk.count(b"\n")
            self.offsets[path] = offset + len(chunk)
        return self.lines


def count_lost(files: list[Path], count: int) -> tuple[int, int]:
    """Return (lost, garbled): sequence numbers never seen, and malformed lines.

    A line is whole when it ends with the writer's padding after an 8-digit
    number. A peer's own prefix (time stamp, stream) before it is allowed.
    """
    seen = bytearray(count)
    garbled = 0
    pad = b" " + b"x" * 90
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                line = line.rstrip(b"\n")
                number = line[-99:-91]
                if not line.endswith(pad) or not number.isdigit():
                    garbled += 1
                    continue
                index = int(number)
                if index < count:
                    seen[index] = 1
    return count - sum(seen), garbled


def _release(fifo: Path) -> None:
    """Open the child's FIFO for writing; the child is blocked reading it."""

    def try_open() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader yet
                return None
            raise

    fd = procs.wait_for(try_open, 30, "the log writer to wait on its FIFO", 0.01)
    os.write(fd, b"go\n")
    os.close(fd)


def _one_mode(peer_cls: type[Peer], mode: str, count: int) -> Metrics:
    with session(peer_cls, f"logs-{mode}") as (ws, peer):
        fifo = ws.root / "go.fifo"
        os.mkfifo(fifo)
        project = ws.add_project(
            "logs",
            f"read -r _ < '{fifo}'\nexec '{sys.executable}' -S '{WRITER}' "
            f"{mode} {count}",
            restart=False,
        )
        peer.write_config(ws.projects, Settings(start_seconds=1.0))
        since = time.time()
        peer.start_daemon()
        (start,) = wait_all_started(ws.projects, since, timeout=60)
        # Release the writer only after the start seconds, so that no peer
        # takes its quick exit for a failed start and runs it again.
        time.sleep(1.5)

        pids = peer.daemon_pids()
        idle_rss = procs.rss_mib(pids)
        cpu_before = procs.total_cpu_seconds(pids)
        counter = LineCounter(peer, project.name)
        clock = time.perf_counter()
        _release(fifo)

        # Stop waiting when every line is in, when the writer has exited and
        # the log has not grown for 3 s (so lines were lost), or at 10 minutes.
        last_growth = time.perf_counter()
        last_lines = 0
        while counter.poll() < count:
            now = time.perf_counter()
            if counter.lines != last_lines:
                last_lines, last_growth = counter.lines, now
            writer_done = not procs.is_alive(start.pid)
            if (writer_done and now - last_growth > 3.0) or now - clock > 600:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - clock
        cpu = procs.total_cpu_seconds(pids) - cpu_before
        peak = procs.peak_rss_mib(pids)
        if len(read_starts(project)) != 1:
            raise RuntimeError(
                f"{peer_cls.name} started the log writer more than once."
            )
        lost, garbled = count_lost(peer.log_files(project.name), count)
    return {
        f"{mode}_s": seconds,
        f"{mode}_lost": lost,
        f"{mode}_garbled": garbled,
        f"{mode}_cpu_s": cpu,
        f"{mode}_peak_rss_mib": peak,
        f"{mode}_rss_over_idle_mib": peak - idle_rss,
    }


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    count = 2_000 if quick else 1_000_000
    metrics: Metrics = {}
    for mode in ("block", "line"):
        metrics.update(_one_mode(peer_cls, mode, count))
    return metrics
