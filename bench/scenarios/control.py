"""Control: status of N projects, as a CLI process and as in-process round trips."""

from __future__ import annotations

import json
import statistics
import time

from bench import procs
from bench.peers.base import Peer, Settings
from bench.scenarios.common import (
    Metrics,
    percentile,
    session,
    sleep_child,
    wait_all_started,
    wall_times,
)

TITLE = "control"
FEATURES = ("control",)
MEASURES = (
    "With N always-running projects: `status_cli_s` is the median wall time "
    "of the status command as a new process (supervisorctl status, circusctl "
    "status, pm2 status, runvisor status), `status_json_cli_s` the same for "
    "the JSON form where there is one; `roundtrip_ms_*` are status requests "
    "made one after another from one client process that stays connected."
)


def run(peer_cls: type[Peer], quick: bool) -> Metrics:
    count = 5 if quick else 100
    cli_runs = 3 if quick else 10
    roundtrips = 20 if quick else 500
    with session(peer_cls, "control") as (ws, peer):
        for i in range(count):
            name = f"ctl{i:04d}"
            ws.add_project(name, sleep_child(ws, name))
        names = [p.name for p in ws.projects]
        peer.write_config(ws.projects, Settings(start_seconds=1.0))
        since = time.time()
        peer.start_daemon()
        wait_all_started(ws.projects, since, timeout=120)
        procs.wait_for(lambda: peer.all_running(names), 60, "all projects running", 0.2)

        status_cli = wall_times(peer, peer.status_argv(), cli_runs)
        status_json_cli = wall_times(peer, peer.status_argv(as_json=True), cli_runs)
        result = peer.run_cli(peer.roundtrip_argv(roundtrips), timeout=300)
        durations_ms = [d * 1000 for d in json.loads(result.stdout)]
    return {
        "status_cli_s": statistics.median(status_cli),
        "status_json_cli_s": statistics.median(status_json_cli),
        "roundtrip_ms_p50": percentile(durations_ms, 0.5),
        "roundtrip_ms_p99": percentile(durations_ms, 0.99),
    }
