"""Sampling profiles of the runvisor daemon with py-spy, and their summary.

`run.py --profile DIR` attaches `py-spy record` to every `runvisor serve`
that a scenario starts, once it is ready, and writes py-spy's raw
(collapsed-stack) output to DIR. Summarize one file with

    python bench/profile.py DIR/FILE.txt [--top N]

which prints the functions with the most samples on top of the stack
(self) and anywhere in it (inclusive). py-spy counts only samples in which
the thread was running, because `--idle` is not given.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

PY_SPY = Path(__file__).resolve().parent / ".peers" / "venv" / "bin" / "py-spy"

# One sampled frame: "function (file:line)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def start(pid: int, output: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start sampling `pid` until it exits; the raw profile goes to `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(PY_SPY),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "100",
            "--nonblocking",
            "--output",
            str(output),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    # Keep the path from the package folder on, which is enough to tell.
    for anchor in ("/site-packages/", "/supervisor/", "/lib/python3"):
        if anchor in path:
            path = path[path.index(anchor) + 1 :]
            break
    return f"{match['function']} ({path})"


def summarize(raw: Path, top: int = 15) -> str:
    """Return the top functions by self and inclusive samples as Markdown."""
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [_function(frame) for frame in stack.split(";")]
        total += count
        self_samples[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count
    if total == 0:
        return f"{raw.name}: no samples\n"
    lines = [
        f"{raw.name}: {total} samples at 100 Hz (about {total / 100:.1f} CPU seconds)"
    ]
    for title, counter in (("self", self_samples), ("inclusive", inclusive)):
        lines += ["", f"| {title} % | function |", "| ---: | --- |"]
        for function, count in counter.most_common(top):
            lines.append(f"| {100 * count / total:.1f} | `{function}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarize a py-spy raw profile.")
    parser.add_argument("raw", type=Path, help="raw output of py-spy record")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    args = parser.parse_args()
    print(summarize(args.raw, args.top), end="")


if __name__ == "__main__":
    main()
