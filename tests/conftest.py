"""Fixtures shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
from trio.testing import MockClock

from .helpers import marked_pids, runvisor_argv

# Prefixes of marker names (exec -a) used by the tests; anything left alive
# after a test is a leak that the test itself should have prevented.
MARKER_PREFIXES = ("t0", "t1", "e2e-", "f0", "f1", "f2", "fault-")


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield
    leftovers = [pid for prefix in MARKER_PREFIXES for pid in marked_pids(prefix)]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"processes left running by the test: {leftovers}"


@pytest.fixture
def runvisor_command() -> list[str]:
    """The command that runs runvisor in end-to-end tests: the single
    executable named by RUNVISOR_BINARY (`make test-frozen` sets it), or the
    source tree with this Python."""
    return runvisor_argv()


@pytest.fixture
def fast_clock() -> MockClock:
    """Simulated time that jumps ahead once the run has been idle for 0.25 s
    of real time.

    Real child processes keep running in real time, so a clock that jumped
    at once (`autojump_clock`) would make every quick child look long-lived;
    the short threshold lets quick children finish first.
    """
    return MockClock(autojump_threshold=0.25)
