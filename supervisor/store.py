"""The daemon's asynchronous access to the run history.

Writers call `put_run` and `put_event`, which only append to an in-memory
queue. One writer task drains that queue in batches, one transaction per
batch, on its own connection (a `supervisor.database.Database`), which
maintenance writes (prune, marking runs lost) share. Reads go through a
second connection, so neither a slow batch nor a write that waits for
another process's lock holds up `history`.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from .database import (
    MAX_BATCH_ROWS,
    SHUTDOWN_WRITE_TIMEOUT,
    Database,
    Row,
    _event_row,
    _run_row,
)
from .model import RunEvent, RunRecord, RunStatus

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Store:
    """Asynchronous access to the database for the daemon.

    Owned by one trio task tree: `put_run`, `put_event` and `next_run_id`
    must be called from the trio thread. Rows become visible to readers once
    the `writer` task commits them. `flush` waits for that.
    """

    def __init__(
        self,
        db: Database,
        *,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
    ) -> None:
        self._db = db
        try:
            self._reader = Database.open(db.path, busy_timeout=db.busy_timeout)
        except BaseException:
            db.close()
            raise
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        # Each connection serves one thread at a time anyway. Their own
        # limiters keep writes that wait for a lock from taking every thread
        # of trio's shared limiter, which reads (and the rest of the daemon)
        # would then wait for.
        self._write_threads = trio.CapacityLimiter(1)
        self._read_threads = trio.CapacityLimiter(1)
        self._last_run_id = db.max_run_id()

        # Each item is (is_run, row). Items leave the queue only after they
        # are committed, so a failed batch is retried from the same rows.
        self._queue: deque[tuple[bool, Row]] = deque()
        self._queued_count = 0
        self._committed_count = 0
        self._queue_changed = trio.Event()
        self._commit_happened = trio.Event()
        self._failure_kinds: set[str] = set()
        self._failures_since_success = 0
        self.failed_writes = 0
        """Failed batch write attempts since the store opened."""

    @classmethod
    def open(cls, path: Path) -> Store:
        return cls(Database.open(path))

    def next_run_id(self) -> int:
        """Reserve the next run id without touching the database."""
        self._last_run_id += 1
        return self._last_run_id

    @property
    def last_run_id(self) -> int:
        """The highest run id handed out or stored."""
        return self._last_run_id

    def reserve_run_ids(self, through: int) -> None:
        """Reserve every run id up to `through`, which runs started before
        the store was open have taken."""
        self._last_run_id = max(self._last_run_id, through)

    def put_run(self, run: RunRecord) -> None:
        """Queue an insert or update of the run. Never blocks.

        Raises ValueError at once for a naive timestamp.
        """
        self._enqueue(True, _run_row(run))

    def put_event(self, event: RunEvent) -> None:
        """Queue an event row. Never blocks.

        Raises ValueError at once for a naive timestamp.
        """
        self._enqueue(False, _event_row(event))

    async def flush(self) -> None:
        """Wait until every row queued before this call is committed.

        Waits forever if no `writer` task is running.
        """
        target = self._queued_count
        while self._committed_count < target:
            await self._commit_happened.wait()

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit queued rows in batches until cancelled.

        A failed write (disk full, database locked by another process) is
        logged once per kind of error and retried with growing delays, and the
        rows stay queued until they land. On cancellation the rows still
        queued are written in a shielded scope, for at most
        SHUTDOWN_WRITE_TIMEOUT seconds.
        """
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._queue_changed = trio.Event()
                    await self._queue_changed.wait()
                    continue
                await self._write_next_batch()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SHUTDOWN_WRITE_TIMEOUT
                while self._queue and not scope.cancel_called:
                    await self._write_next_batch()
            if self._queue:
                logger.error(
                    "Dropped %d history rows that could not be written to %s "
                    "within %.0f seconds of shutdown",
                    len(self._queue),
                    self._db.path,
                    SHUTDOWN_WRITE_TIMEOUT,
                )

    async def history(
        self,
        project: str | None = None,
        *,
        limit: int | None = 50,
        status: RunStatus | None = None,
        since: datetime | None = None,
    ) -> list[RunRecord]:
        call = partial(
            self._reader.history, project, limit=limit, status=status, since=since
        )
        return await self._read(call)

    async def get_run(self, run_id: int) -> RunRecord | None:
        return await self._read(partial(self._reader.get_run, run_id))

    async def events(
        self,
        project: str | None = None,
        run_id: int | None = None,
        limit: int | None = 100,
    ) -> list[RunEvent]:
        return await self._read(partial(self._reader.events, project, run_id, limit))

    async def last_fire_time(self, project: str) -> datetime | None:
        return await self._read(partial(self._reader.last_fire_time, project))

    async def last_runs(self) -> dict[str, RunRecord]:
        return await self._read(self._reader.last_runs)

    async def mark_lost(self, now: datetime) -> list[RunRecord]:
        return await trio.to_thread.run_sync(
            self._db.mark_lost, now, limiter=self._write_threads
        )

    async def prune(self, project: str, keep: int) -> list[int]:
        """Prune committed runs, as `Database.prune`. Queued rows are not seen.

        Pruning is maintenance: when the database is locked by another
        process or cannot be written, nothing is deleted, the failure is
        logged once per kind of error, and the next prune tries again. It
        writes on the writer's connection, so a prune that waits for a lock
        never holds up reads.
        """
        try:
            return await trio.to_thread.run_sync(
                self._db.prune, project, keep, limiter=self._write_threads
            )
        except (sqlite3.Error, OSError) as exc:
            kind = f"prune {type(exc).__name__}: {exc}"
            if kind not in self._failure_kinds:
                self._failure_kinds.add(kind)
                logger.warning(
                    "Cannot prune the history of %s in %s, so old runs stay "
                    "until the next prune: %s",
                    project,
                    self._db.path,
                    exc,
                )
            return []

    def close(self) -> None:
        """Close both connections. Rows still queued are not written."""
        self._db.close()
        self._reader.close()

    def _enqueue(self, is_run: bool, row: Row) -> None:
        self._queue.append((is_run, row))
        self._queued_count += 1
        self._queue_changed.set()

    async def _read(self, call: Callable[[], T]) -> T:
        # A cancelled read leaves its thread to finish on its own, and the
        # reader lock keeps the next read from overlapping it.
        return await trio.to_thread.run_sync(
            call, abandon_on_cancel=True, limiter=self._read_threads
        )

    async def _write_next_batch(self) -> None:
        batch = list(itertools.islice(self._queue, MAX_BATCH_ROWS))
        # Several updates of one run in a batch collapse into the last one.
        run_rows = {row["id"]: row for is_run, row in batch if is_run}
        event_rows = [row for is_run, row in batch if not is_run]
        delay = self._retry_delay
        while True:
            try:
                await trio.to_thread.run_sync(
                    self._db._write_rows,
                    list(run_rows.values()),
                    event_rows,
                    limiter=self._write_threads,
                )
                break
            except (sqlite3.Error, OSError) as exc:
                self._record_failure(exc, len(batch))
                await trio.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay)

        for _ in batch:
            self._queue.popleft()
        self._committed_count += len(batch)
        self._commit_happened.set()
        self._commit_happened = trio.Event()
        if self._failures_since_success:
            logger.info(
                "Writing history to %s works again after %d failed attempts",
                self._db.path,
                self._failures_since_success,
            )
            self._failures_since_success = 0
            self._failure_kinds.clear()

    def _record_failure(self, exc: BaseException, rows: int) -> None:
        self.failed_writes += 1
        self._failures_since_success += 1
        kind = f"{type(exc).__name__}: {exc}"
        if kind in self._failure_kinds:
            return
        self._failure_kinds.add(kind)
        logger.error(
            "Failed to write %d history rows to %s, so they stay queued and "
            "the write is retried until it works",
            rows,
            self._db.path,
            exc_info=exc,
        )
