"""Measure the lateness floor of the schedule scenario on this machine.

    python bench/spawn_floor.py [COUNT] [--runs N]

Starts COUNT copies of the schedule scenario's `run.sh` (bash records
`$EPOCHREALTIME`, then exits) from one Python thread as fast as
`subprocess.Popen` allows, with no bookkeeping at all, and prints the
lateness of each start after the moment the first spawn began. No process
manager that forks its children from Python at the fire time can start
that many runs with less lateness on the same machine, so the numbers show
how much of a peer's lateness is its own. (One that starts them ahead of
the fire time and releases them then, as runvisor does, can.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def measure(count: int) -> list[float]:
    """Return the lateness in milliseconds of `count` simultaneous starts."""
    folder = Path(tempfile.mkdtemp(prefix="rvbench-floor-"))
    try:
        starts = folder / "starts.log"
        script = folder / "run.sh"
        script.write_text(
            "#!/usr/bin/env bash\n"
            f"printf '%s\\n' \"$EPOCHREALTIME\" >> '{starts}'\n"
            "exit 0\n"
        )
        script.chmod(0o755)
        began = time.time()
        children = [
            subprocess.Popen(
                [script],
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(count)
        ]
        for child in children:
            child.communicate(timeout=60)
        return sorted(
            (float(line) - began) * 1000 for line in starts.read_text().split()
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=200)
    parser.add_argument("--runs", type=int, default=3, help="measurements (default 3)")
    args = parser.parse_args()
    for _ in range(args.runs):
        late = measure(args.count)
        quantiles = statistics.quantiles(late, n=100, method="inclusive")
        print(
            f"{len(late)} starts: p50 {quantiles[49]:.0f} ms, "
            f"p99 {quantiles[98]:.0f} ms, max {late[-1]:.0f} ms"
        )


if __name__ == "__main__":
    main()
