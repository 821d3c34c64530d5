"""Scale: many projects, most of them scheduled, the rest always running."""

from __future__ import annotations

import statistics
import time

from bench import procs
from bench.peers.base import Peer, Settings
from bench.scenarios.common import (
    Metrics,
    session,
    sleep_child,
    wait_all_started,
    wall_times,
)

TITLE = "scale"
MEASURES = (
    "1,000 projects: 800 scheduled (`0 0 1 1 *`, so none fires during the "
    "run) and 200 always running. Peers without a scheduler get the 800 as "
    "configured programs that do not start. `start_s`: daemon launch until "
    "the 200 children run; `rss_mib`: counted daemon RSS 5 s later; "
    "`status_json_cli_s`: median wall time of the JSON status command."
)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    scheduled = 16 if quick else 800
    always = 4 if quick else 200
    schedules = peer_cls.missing_feature("schedule") is None
    with session(peer_cls, "scale") as (ws, peer):
        for i in range(scheduled):
            ws.add_project(
                f"sched{i:04d}",
                "exit 0",
                trigger="schedule" if schedules else "manual",
                restart=False,
                cron="0 0 1 1 *",
            )
        running = []
        for i in range(always):
            name = f"always{i:04d}"
            running.append(ws.add_project(name, sleep_child(ws, name)))
        peer.write_config(ws.projects, Settings(start_seconds=1.0))

        since = time.time()
        peer.start_daemon()
        starts = wait_all_started(running, since, timeout=600)
        start_s = max(s.at for s in starts) - since
        time.sleep(5.0)
        rss = procs.rss_mib(peer.daemon_pids())
        status_json = wall_times(peer, peer.status_argv(as_json=True), 3)
    return {
        "start_s": start_s,
        "rss_mib": rss,
        "status_json_cli_s": statistics.median(status_json),
    }
