"""Schedule fan-out: many projects on `* * * * *`, watched for a few minutes."""

from __future__ import annotations

import math
import time

from bench import spawn_floor
from bench.peers.base import Peer, Settings, read_starts
from bench.scenarios.common import Metrics, percentile, session

TITLE = "schedule"
FEATURES = ("schedule",)
MEASURES = (
    "N projects on `* * * * *` whose `run.sh` records its start and exits. "
    "For each minute boundary watched, a project's start within [-1 s, +59 s) "
    "of it counts: `late_ms_*` is start time minus boundary, `duplicates` the "
    "extra starts in a minute, `misses` the minutes without a start. pm2 "
    "schedules with `cron_restart` and `autorestart: false`. `floor_ms_p99` "
    "is the p99 lateness of the same N scripts started by bare "
    "`subprocess.Popen` calls right after the peer stopped "
    "(`bench/spawn_floor.py`): no process manager that forks its runs "
    "from Python at the fire time starts them sooner on this machine "
    "(runvisor starts bash 2 s ahead and releases it at the fire time). "
    "`over_floor_ms_p99` is the peer's p99 minus that floor: the lateness "
    "the peer adds, or, when negative, what an early start saved."
)


def _wait_for_second(low: float, high: float) -> None:
    """Sleep until the wall clock's second within the minute is in [low, high)."""
    while not low <= time.time() % 60 < high:
        time.sleep(0.2)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    count = 3 if quick else 200
    minutes = 1 if quick else 3
    with session(peer_cls, "schedule") as (ws, peer):
        for i in range(count):
            ws.add_project(
                f"cron{i:03d}", "exit 0", trigger="schedule", cron="* * * * *"
            )
        peer.write_config(ws.projects, Settings(start_seconds=1.0))

        # Start about 20 s before a boundary, so the daemon is ready and idle
        # when the first watched minute begins without wasting a minute.
        _wait_for_second(38, 45)
        peer.start_daemon()
        first = math.ceil((time.time() + 5) / 60) * 60
        boundaries = [first + 60 * k for k in range(minutes)]
        time.sleep(max(0.0, boundaries[-1] + 10 - time.time()))
        peer.shutdown(timeout=60)

        lateness: list[float] = []
        duplicates = misses = 0
        for project in ws.projects:
            starts = [s.at for s in read_starts(project)]
            for boundary in boundaries:
                fired = [at for at in starts if boundary - 1 <= at < boundary + 59]
                if not fired:
                    misses += 1
                    continue
                duplicates += len(fired) - 1
                lateness.append(fired[0] - boundary)
    if not lateness:
        lateness = [math.inf]
    ms = [value * 1000 for value in lateness]
    floor = spawn_floor.measure(count)
    late_p99 = percentile(ms, 0.99)
    floor_p99 = percentile(floor, 0.99)
    return {
        "late_ms_p50": percentile(ms, 0.5),
        "late_ms_p99": late_p99,
        "late_ms_max": max(ms),
        "floor_ms_p99": floor_p99,
        "over_floor_ms_p99": late_p99 - floor_p99,
        "duplicates": duplicates,
        "misses": misses,
    }
