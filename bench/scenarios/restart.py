"""Restart latency: SIGKILL of an always-running child until its successor runs."""

from __future__ import annotations

import os
import signal
import statistics
import time

from bench import procs
from bench.peers.base import Peer, Settings, Start, read_starts
from bench.scenarios.common import Metrics, session, sleep_child, wait_all_started

TITLE = "restart"
MEASURES = (
    "From `kill -9` of the running child to the first line its successor's "
    "`run.sh` executes (its own `$EPOCHREALTIME`), with each peer's smallest "
    "restart delay; median and maximum over the kills of one repetition."
)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    kills = 2 if quick else 10
    settings = Settings(start_seconds=1.0, fast_restart=True)
    with session(peer_cls, "restart") as (ws, peer):
        project = ws.add_project("restart", sleep_child(ws, "restart"))
        peer.write_config(ws.projects, settings)
        since = time.time()
        peer.start_daemon()
        wait_all_started(ws.projects, since, timeout=60)

        latencies = []
        for _ in range(kills):
            # Wait past the start seconds so every peer counts the run as a
            # good start and restarts it without a backoff.
            time.sleep(settings.start_seconds + 0.5)
            current = read_starts(project)[-1]
            if not procs.carries_marker(current.pid, ws.marker):
                raise RuntimeError(f"{peer_cls.name} has no live child to kill.")
            killed_at = time.time()
            os.kill(current.pid, signal.SIGKILL)

            def successor_after(killed_at: float = killed_at) -> Start | None:
                return next((s for s in read_starts(project) if s.at > killed_at), None)

            successor = procs.wait_for(
                successor_after,
                30,
                "the restarted child",
                0.005,
            )
            latencies.append(successor.at - killed_at)
    return {
        "latency_ms_median": statistics.median(latencies) * 1000,
        "latency_ms_max": max(latencies) * 1000,
    }
