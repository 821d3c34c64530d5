"""Write numbered lines of 100 bytes to stdout as fast as possible.

Usage: `python -S writer.py block|line COUNT`. Each line is an 8-digit
sequence number, a space, 90 `x` and a newline, so a reader can tell which
lines were lost or cut. `block` goes through an 8 KiB buffer (what a program
writing to a pipe usually does); `line` makes one write(2) call per line.
"""

import os
import sys

PAD = b"x" * 90


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    if mode == "block":
        out = open(1, "wb", buffering=8192, closefd=False)  # noqa: SIM115
        for i in range(count):
            out.write(b"%08d %s\n" % (i, PAD))
        out.flush()
    elif mode == "line":
        for i in range(count):
            os.write(1, b"%08d %s\n" % (i, PAD))
    else:
        raise SystemExit(f"Unknown mode {mode!r}: use block or line.")


if __name__ == "__main__":
    main()
