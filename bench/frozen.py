"""Compare the single executable with the source tree, in the same run.

Measures the executable's size and, for both, the wall time of
`runvisor --version`, of `runvisor status` against a running daemon (one
control-socket round trip plus start-up), and of `runvisor serve` from
start to READY=1. Runs alternate between the two, and each number is the
median of many runs, with the range.

    .venv/bin/python bench/frozen.py [--binary dist/runvisor] [--runs 30]
        [--markdown bench/FROZEN.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0

Command = list[str]


def timed(argv: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - started


def serve_until_ready(command: Command, config: Path, env: dict[str, str]) -> float:
    """Start `serve`, return the seconds until READY=1, then stop it."""
    with tempfile.TemporaryDirectory() as folder:
        address = os.path.join(folder, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            listener.settimeout(READY_TIMEOUT)
            started = time.perf_counter()
            daemon = subprocess.Popen(
                [*command, "--config", str(config), "serve"],
                env={**env, "NOTIFY_SOCKET": address},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while b"READY=1" not in listener.recv(4096).splitlines():
                    pass
                return time.perf_counter() - started
            finally:
                daemon.terminate()
                daemon.wait(30)


def measure(
    runs: int, variants: dict[str, Callable[[], float]]
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            samples[name].append(run())
    return samples


def milliseconds(values: list[float]) -> str:
    median = statistics.median(values) * 1000
    return f"{median:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=str(REPOSITORY / "dist" / "runvisor"))
    parser.add_argument(
        "--runs", type=int, default=30, help="runs of each command (default 30)"
    )
    parser.add_argument(
        "--serve-runs", type=int, default=5, help="daemon starts (default 5)"
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the table")
    args = parser.parse_args(argv)

    binary = Path(args.binary).resolve()
    if not os.access(binary, os.X_OK):
        parser.error(f"{binary} is missing: build it with 'make binary'")
    commands: dict[str, Command] = {
        "executable": [str(binary)],
        "source": [sys.executable, "-m", "supervisor"],
    }

    with tempfile.TemporaryDirectory(prefix="runvisor-bench-") as folder:
        root = Path(folder)
        config = root / "runvisor.toml"
        config.write_text(
            "[runvisor]\n"
            f'data_dir = "{root / "data"}"\n'
            f'socket = "{root / "control.sock"}"\n'
            '[credentials]\nbackend = "file"\n'
            f'[projects.idle]\ntrigger = "manual"\npath = "{root}"\n'
        )
        env = dict(os.environ, TMPDIR=folder, RUNVISOR_CONFIG=str(config))
        env.pop("NOTIFY_SOCKET", None)

        version = measure(
            args.runs,
            {
                name: lambda command=command: timed([*command, "--version"], env)
                for name, command in commands.items()
            },
        )
        ready = measure(
            args.serve_runs,
            {
                name: lambda command=command: serve_until_ready(command, config, env)
                for name, command in commands.items()
            },
        )
        # One daemon from source answers both clients' status requests.
        daemon = subprocess.Popen(
            [*commands["source"], "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not (root / "control.sock").exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not create its socket in time")
                time.sleep(0.05)
            status = measure(
                args.runs,
                {
                    name: lambda command=command: timed([*command, "status"], env)
                    for name, command in commands.items()
                },
            )
        finally:
            daemon.terminate()
            daemon.wait(30)

    size = binary.stat().st_size
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, by "
        f"`bench/frozen.py --runs {args.runs} --serve-runs {args.serve_runs}`. "
        "Each time is the median of the runs, with the range.",
        "",
        f"Executable size: {size / 1024 / 1024:.1f} MiB ({size} bytes)",
        "",
        "| command | executable | source tree |",
        "| --- | --- | --- |",
    ]
    for label, samples in (
        ("`runvisor --version`", version),
        ("`runvisor status` (daemon running)", status),
        ("`runvisor serve` until READY=1", ready),
    ):
        lines.append(
            f"| {label} | {milliseconds(samples['executable'])} "
            f"| {milliseconds(samples['source'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text("# Single executable\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
