"""Stop: children whose bash ignores SIGTERM and that have a grandchild."""

from __future__ import annotations

import time

from bench import procs
from bench.peers.base import Peer, Settings
from bench.scenarios.common import Metrics, project_pids, session, wait_all_started

TITLE = "stop"
FEATURES = ("stop",)
MEASURES = (
    "N projects whose `run.sh` ignores SIGTERM and waits on a grandchild "
    "that ignores it too, so only SIGKILL to the group ends them. `stop_s`: "
    "from the stop request for all N until every `run.sh` is gone (the stop "
    "timeout is 2 s); `left_after_stop`: project processes alive 1 s later; "
    "then the projects are started again and the daemon shut down: "
    "`shutdown_s` until the daemon exited, `left_after_shutdown` 1 s later."
)


def _body(ws_child: str) -> str:
    return f"trap '' TERM\n(exec -a {ws_child} sleep 100000) &\nwait\n"


def _wait_grandchildren(ws_marker: str, count: int) -> None:
    procs.wait_for(
        lambda: (
            len(procs.marked_pids(ws_marker, argv_contains=":grandchild:")) >= count
        ),
        60,
        f"{count} grandchildren",
        0.05,
    )


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    count = 2 if quick else 20
    settings = Settings(start_seconds=1.0, stop_timeout=2.0)
    with session(peer_cls, "stop") as (ws, peer):
        for i in range(count):
            name = f"stop{i:03d}"
            ws.add_project(name, _body(ws.child_name(name, "grandchild")))
        names = [p.name for p in ws.projects]
        peer.write_config(ws.projects, settings)
        since = time.time()
        peer.start_daemon()
        starts = wait_all_started(ws.projects, since, timeout=120)
        _wait_grandchildren(ws.marker, count)
        time.sleep(settings.start_seconds + 0.5)

        clock = time.perf_counter()
        peer.stop_projects(names)
        procs.wait_for(
            lambda: not any(procs.is_alive(s.pid) for s in starts),
            60,
            "every run.sh to exit",
            0.01,
        )
        stop_s = time.perf_counter() - clock
        time.sleep(1.0)
        left_after_stop = len(project_pids(ws))
        for pid in project_pids(ws):
            procs.kill_pid(pid, ws.marker)

        since = time.time()
        peer.start_projects(names)
        wait_all_started(ws.projects, since, timeout=120)
        _wait_grandchildren(ws.marker, count)
        time.sleep(settings.start_seconds + 0.5)
        shutdown_s = peer.shutdown(timeout=60)
        time.sleep(1.0)
        left_after_shutdown = len(project_pids(ws))
    return {
        "stop_s": stop_s,
        "left_after_stop": left_after_stop,
        "shutdown_s": shutdown_s,
        "left_after_shutdown": left_after_shutdown,
    }
