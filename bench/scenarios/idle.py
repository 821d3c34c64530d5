"""Idle cost: the daemon alone, then with always-running children that sleep."""

from __future__ import annotations

import time

from bench import procs
from bench.peers.base import Peer, Settings
from bench.scenarios.common import Metrics, session, sleep_child, wait_all_started

TITLE = "idle"
MEASURES = (
    "RSS (MiB) of the counted daemon processes and their CPU seconds over a "
    "quiet window, with no projects and with N always-running children that sleep."
)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    children = 3 if quick else 100
    window = 2.0 if quick else 30.0
    settle = 1.0 if quick else 5.0
    metrics: Metrics = {}
    for label, count in (("alone", 0), ("children", children)):
        with session(peer_cls, f"idle-{label}") as (ws, peer):
            for i in range(count):
                name = f"idle{i:04d}"
                ws.add_project(name, sleep_child(ws, name))
            peer.write_config(ws.projects, Settings())
            since = time.time()
            peer.start_daemon()
            wait_all_started(ws.projects, since, timeout=120)
            time.sleep(settle)

            pids = peer.daemon_pids()
            cpu_before = procs.total_cpu_seconds(pids)
            time.sleep(window)
            metrics[f"cpu_s_{label}"] = procs.total_cpu_seconds(pids) - cpu_before
            metrics[f"rss_mib_{label}"] = procs.rss_mib(pids)
    return metrics
