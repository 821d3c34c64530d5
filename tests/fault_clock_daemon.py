"""Run the real daemon in its own process on a sped-up clock.

    python -m tests.fault_clock_daemon CONFIG RATE ORIGIN BASE

Everything is the real daemon except time: trio's clock runs RATE times
faster than real time (`MockClock(rate=RATE)`), so stop timeouts and
backoff shrink, and the wall clock is BASE + RATE * (now - ORIGIN) in Unix
seconds, so a cron of `* * * * *` fires every 60 / RATE real seconds. The
wall clock depends on real time alone, so it goes on where it was when the
process is killed and started again.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import trio
from trio.testing import MockClock

from supervisor.daemon import Daemon


class SpedUpWallClock:
    def __init__(self, rate: float, origin: float, base: float) -> None:
        self.rate = rate
        self.origin = origin
        self.base = base

    def now(self) -> datetime:
        elapsed = (time.time() - self.origin) * self.rate
        return datetime.fromtimestamp(self.base + elapsed, UTC)


def main() -> None:
    config, rate, origin, base = sys.argv[1:]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    wall = SpedUpWallClock(float(rate), float(origin), float(base))
    daemon = Daemon(Path(config), clock=wall)
    trio.run(daemon.serve, clock=MockClock(rate=float(rate)))


if __name__ == "__main__":
    main()
