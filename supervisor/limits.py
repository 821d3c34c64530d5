"""Bounds of the numbers that commands accept and requests carry.

The CLI checks its arguments against them, so a wrong value is a usage
error, and the daemon rejects a request outside them when it decodes it,
before SQLite or the log reader sees the number. This module imports
nothing, so `runvisor --help` stays fast.
"""

MAX_HISTORY_LIMIT = 1_000_000
"""Rows that one `history` request may return."""

MAX_RUN_ID = 2**63 - 1
"""The largest run id: SQLite stores integers as signed 64-bit numbers."""

MAX_TAIL = 1_000_000_000
"""Stored log lines that one `logs --tail` request may ask for."""

MAX_NEXT_COUNT = 1_000
"""Fire times that one `next` command lists."""
