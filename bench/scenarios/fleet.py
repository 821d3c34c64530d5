"""Fleet start and stop: N always-running projects from daemon start to all
running, then daemon shutdown until every child is gone."""

from __future__ import annotations

import time

from bench import procs
from bench.peers.base import Peer, Settings
from bench.scenarios.common import Metrics, session, sleep_child, wait_all_started

TITLE = "fleet"
MEASURES = (
    "`start_s`: from launching the daemon (for pm2, `pm2 start` of the "
    "ecosystem file) until every child has started, read from the children's "
    "own start times; `running_s`: until the peer's status says all are "
    "running (that includes the start seconds where the peer has them); "
    "`stop_s`: from the shutdown request until every child is gone; "
    "`shutdown_s`: until the daemon has exited too."
)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    count = 5 if quick else 100
    settings = Settings(start_seconds=1.0)
    with session(peer_cls, "fleet") as (ws, peer):
        for i in range(count):
            name = f"fleet{i:04d}"
            ws.add_project(name, sleep_child(ws, name))
        names = [p.name for p in ws.projects]
        peer.write_config(ws.projects, settings)

        since = time.time()
        clock = time.perf_counter()
        peer.start_daemon()
        starts = wait_all_started(ws.projects, since, timeout=300)
        start_s = max(s.at for s in starts) - since
        procs.wait_for(
            lambda: peer.all_running(names), 120, "all projects running", 0.2
        )
        running_s = time.perf_counter() - clock

        children = [s.pid for s in starts]
        daemon_pids = peer.daemon_pids()
        clock = time.perf_counter()
        peer.request_shutdown()
        procs.wait_for(
            lambda: not any(procs.is_alive(pid) for pid in children),
            300,
            "every child to exit",
            0.01,
        )
        stop_s = time.perf_counter() - clock
        procs.wait_for(
            lambda: not any(procs.is_alive(pid) for pid in daemon_pids),
            120,
            "the daemon to exit",
            0.01,
        )
        shutdown_s = time.perf_counter() - clock
    return {
        "start_s": start_s,
        "running_s": running_s,
        "stop_s": stop_s,
        "shutdown_s": shutdown_s,
    }
