"""Run history and run events in SQLite: the synchronous layer.

`Database` owns one connection, made with `check_same_thread=False` and
guarded by a lock, so any one thread at a time may use it. The CLI uses it
directly when no daemon runs, `runvisor serve` opens it before its event
loop runs, and the daemon's `supervisor.store.Store` calls it from worker
threads. Nothing here imports trio.

The file uses WAL, so readers do not wait for the writer, with
`synchronous=NORMAL` and a busy timeout so that a second process (the CLI
next to a running daemon) waits for the lock instead of failing at once.
Timestamps are stored as ISO 8601 UTC text to the millisecond
("2026-12-04T17:43:26.123Z"), which sorts in time order. Finer digits are
truncated.

The schema version is SQLite's `PRAGMA user_version`. To change the schema,
append a function to `MIGRATIONS`: `open` applies every migration past the
stored version inside one `BEGIN IMMEDIATE` transaction, so two processes
opening a fresh file at the same time cannot both apply it. A migration gets
a `sqlite_utils.Database`, whose `transform` and `add_column` do the table
rebuilds that SQLite's ALTER TABLE cannot.

sqlite-utils is imported only when a migration runs. Every other statement
goes through the sqlite3 module with fixed SQL: importing sqlite-utils pulls
in click and pluggy (about 4 MiB of daemon memory and 35 ms of start-up),
and its `upsert_all` reads the table's schema again on every batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .errors import StoreError
from .model import CredentialInfo, RunEvent, RunRecord, RunStatus

if TYPE_CHECKING:
    import sqlite_utils

logger = logging.getLogger(__name__)

Row = dict[str, Any]
T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a statement waits for another connection's lock before failing."""

MAX_BATCH_ROWS = 5000
"""Rows the writer task commits in one transaction at most."""

SHUTDOWN_WRITE_TIMEOUT = 15.0
"""Seconds the writer keeps trying to write queued rows after cancellation."""

LOST_REASON = "the daemon stopped while the run was going"


def _migration_1_initial_schema(db: sqlite_utils.Database) -> None:
    # AUTOINCREMENT keeps the highest id ever used in sqlite_sequence, so a
    # run id is never reused after pruning deletes the newest rows.
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            project TEXT NOT NULL,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            pid INTEGER,
            exit_code INTEGER,
            signal INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            fire_time TEXT
        )
        """
    )
    db.execute("CREATE INDEX runs_by_project ON runs (project, id)")
    db.execute("CREATE INDEX runs_by_status ON runs (status)")
    db.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            project TEXT NOT NULL,
            run_id INTEGER,
            kind TEXT NOT NULL,
            at TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )
        """
    )
    db.execute("CREATE INDEX events_by_project ON events (project, id)")
    db.execute("CREATE INDEX events_by_run ON events (run_id)")


def _migration_2_credential_index(db: sqlite_utils.Database) -> None:
    # keyring cannot list what it stores, so the nicknames live here. The
    # secrets never do: they stay in the credential backend.
    db.execute(
        """
        CREATE TABLE credentials (
            nickname TEXT PRIMARY KEY,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1_initial_schema,
    _migration_2_credential_index,
]
"""Schema migrations in order. Migration N brings the schema to version N."""


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as UTC ISO 8601 text with milliseconds.

    Raises ValueError for a naive datetime, whose time zone would be a guess.
    """
    if moment.tzinfo is None:
        raise ValueError(
            f"The timestamp {moment.isoformat()} has no time zone. "
            "Pass an aware datetime, such as datetime.now(UTC)."
        )
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"


def _optional_timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


def _run_row(run: RunRecord) -> Row:
    return {
        "id": run.id,
        "project": run.project,
        "trigger": str(run.trigger),
        "status": str(run.status),
        "started_at": format_timestamp(run.started_at),
        "ended_at": _optional_timestamp(run.ended_at),
        "pid": run.pid,
        "exit_code": run.exit_code,
        "signal": run.signal,
        "reason": run.reason,
        "fire_time": _optional_timestamp(run.fire_time),
    }


_RUN_COLUMNS = (
    "id",
    "project",
    "trigger",
    "status",
    "started_at",
    "ended_at",
    "pid",
    "exit_code",
    "signal",
    "reason",
    "fire_time",
)
_UPSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)})"
    f" VALUES ({', '.join(':' + c for c in _RUN_COLUMNS)})"
    " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS[1:])
)
_INSERT_EVENT = (
    "INSERT INTO events (project, run_id, kind, at, detail)"
    " VALUES (:project, :run_id, :kind, :at, :detail)"
)


def _event_row(event: RunEvent) -> Row:
    return {
        "project": event.project,
        "run_id": event.run_id,
        "kind": event.kind,
        "at": format_timestamp(event.at),
        "detail": event.detail,
    }


def _make_private(path: Path) -> None:
    """Create the database file with mode 0600, or narrow the mode of one
    that an older version created 0644.

    SQLite creates the -wal and -shm files with the mode of the database
    file. A file owned by another user keeps its mode, because opening
    someone else's database to read it must not change their file.

    An existing file is never opened here: closing any descriptor of a file
    releases every POSIX lock that this process holds on it, including
    those of SQLite connections already open on it (the Store opens its
    reader while its writer is open). Another process's connection then
    takes the database for unused, checkpoints and resets the WAL, and rows
    that this process committed are lost.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        if path.stat().st_uid == os.geteuid():
            path.chmod(0o600)
    else:
        try:
            # The creation mode was filtered by the umask; make it exact.
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if companion.stat().st_uid == os.geteuid():
                companion.chmod(0o600)


class Database:
    """One SQLite connection to the runvisor database, safe to share between
    threads because every method holds the instance's lock. Create it with
    `open`."""

    def __init__(self, db: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
        self._db = db
        self._lock = threading.RLock()
        self.path = path
        self.busy_timeout = busy_timeout

    @classmethod
    def open(
        cls, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> Database:
        """Open or create the database file and bring its schema up to date.

        Raises StoreError when the file cannot be created, opened or migrated.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _make_private(path)
            conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise _open_error(path, exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            _apply_migrations(conn, path)
        except (OSError, sqlite3.Error) as exc:
            conn.close()
            raise _open_error(path, exc) from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, busy_timeout)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def history(
        self,
        project: str | None = None,
        *,
        limit: int | None = 50,
        status: RunStatus | None = None,
        since: datetime | None = None,
    ) -> list[RunRecord]:
        """Return runs, newest first, optionally filtered by project, status
        and start time (`since` inclusive). `limit=None` returns them all."""
        sql, params = _select(
            "runs",
            {
                "project = ?": project,
                "status = ?": None if status is None else status.value,
                "started_at >= ?": None if since is None else format_timestamp(since),
            },
            limit,
        )
        return [_to_run(row) for row in self._query(sql, params)]

    def get_run(self, run_id: int) -> RunRecord | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", [run_id])
        return _to_run(rows[0]) if rows else None

    def events(
        self,
        project: str | None = None,
        run_id: int | None = None,
        limit: int | None = 100,
    ) -> list[RunEvent]:
        """Return stored events, newest first, optionally filtered by project
        and run. `limit=None` returns them all."""
        sql, params = _select(
            "events", {"project = ?": project, "run_id = ?": run_id}, limit
        )
        return [msgspec.convert(row, RunEvent) for row in self._query(sql, params)]

    def last_fire_time(self, project: str) -> datetime | None:
        """Return the latest cron fire time among the project's runs."""
        rows = self._query(
            "SELECT max(fire_time) AS fire_time FROM runs WHERE project = ?",
            [project],
        )
        text = rows[0]["fire_time"]
        return None if text is None else datetime.fromisoformat(text)

    def last_runs(self) -> dict[str, RunRecord]:
        """Return the newest run of each project that has one."""
        rows = self._query(
            "SELECT * FROM runs WHERE id IN (SELECT max(id) FROM runs GROUP BY project)"
        )
        return {row["project"]: _to_run(row) for row in rows}

    def max_run_id(self) -> int:
        """Return the highest run id ever stored, pruned runs included, or 0.

        Raises StoreError when the file cannot be read.
        """
        try:
            rows = self._query(
                "SELECT max("
                " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'runs'), 0),"
                " coalesce((SELECT max(id) FROM runs), 0)) AS max_id"
            )
        except sqlite3.Error as error:
            raise StoreError(
                f"Cannot read the run history in {self.path}: {error}. If the "
                "file is damaged, move it aside (the daemon then starts a new "
                "history) or restore it from a backup."
            ) from None
        return int(rows[0]["max_id"])

    def write_batch(self, runs: list[RunRecord], events: list[RunEvent]) -> None:
        """Upsert the runs by id and insert the events, in one transaction."""
        self._write_rows(
            [_run_row(run) for run in runs], [_event_row(e) for e in events]
        )

    def mark_lost(self, now: datetime) -> list[RunRecord]:
        """Mark every run still `running` as `lost`, ended at `now`.

        Called at start-up, when no run of this daemon can be going yet.
        Returns the changed runs, whose pids name process groups that may
        still be alive. Raises StoreError when the file cannot be written.
        """
        ended_at = format_timestamp(now)
        try:
            with self._lock, self._write_transaction():
                rows = self._fetch(
                    "SELECT * FROM runs WHERE status = 'running' ORDER BY id"
                )
                self._db.execute(
                    "UPDATE runs SET status = ?, ended_at = ?, reason = ?"
                    " WHERE status = 'running'",
                    [RunStatus.LOST.value, ended_at, LOST_REASON],
                )
        except sqlite3.Error as error:
            raise StoreError(
                f"Cannot mark the interrupted runs lost in {self.path}: {error}. "
                "If the file is damaged, move it aside (the daemon then starts "
                "a new history) or restore it from a backup."
            ) from None
        lost = {
            "status": RunStatus.LOST.value,
            "ended_at": ended_at,
            "reason": LOST_REASON,
        }
        return [_to_run(row | lost) for row in rows]

    def prune(self, project: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` runs of the project, with their events.

        A run that is still `running` is never deleted. Events of the project
        that belong to no run are deleted once they are older than the oldest
        run left. Returns the deleted run ids, oldest first, so the caller can
        delete their log files.
        """
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, not {keep}.")
        with self._lock, self._write_transaction():
            rows = self._fetch(
                "SELECT id FROM runs WHERE project = ? AND status != 'running'"
                " AND id NOT IN"
                " (SELECT id FROM runs WHERE project = ? ORDER BY id DESC LIMIT ?)"
                " ORDER BY id",
                [project, project, keep],
            )
            deleted = [int(row["id"]) for row in rows]
            if deleted:
                ids = msgspec.json.encode(deleted).decode()
                self._db.execute(
                    "DELETE FROM events"
                    " WHERE run_id IN (SELECT value FROM json_each(?))",
                    [ids],
                )
                self._db.execute(
                    "DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))",
                    [ids],
                )
            self._db.execute(
                "DELETE FROM events WHERE project = ? AND run_id IS NULL"
                " AND at < (SELECT min(started_at) FROM runs WHERE project = ?)",
                [project, project],
            )
        return deleted

    def credentials(self) -> list[CredentialInfo]:
        """Return the credential index, sorted by nickname."""
        rows = self._query("SELECT * FROM credentials ORDER BY nickname")
        return [msgspec.convert(row, CredentialInfo) for row in rows]

    def get_credential(self, nickname: str) -> CredentialInfo | None:
        rows = self._query("SELECT * FROM credentials WHERE nickname = ?", [nickname])
        return msgspec.convert(rows[0], CredentialInfo) if rows else None

    def add_credential(self, nickname: str, description: str, now: datetime) -> bool:
        """Add a nickname to the index. Returns False when it is already there."""
        stamp = format_timestamp(now)
        with self._lock, self._write_transaction():
            cursor = self._db.execute(
                "INSERT INTO credentials"
                " (nickname, description, created_at, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (nickname) DO NOTHING",
                [nickname, description, stamp, stamp],
            )
            return bool(cursor.rowcount)

    def update_credential(
        self, nickname: str, description: str | None, now: datetime
    ) -> bool:
        """Set `updated_at`, and the description unless it is None.

        Returns False when the nickname is not in the index.
        """
        with self._lock, self._write_transaction():
            cursor = self._db.execute(
                "UPDATE credentials SET updated_at = ?,"
                " description = coalesce(?, description) WHERE nickname = ?",
                [format_timestamp(now), description, nickname],
            )
            return bool(cursor.rowcount)

    def delete_credential(self, nickname: str) -> bool:
        """Remove a nickname. Returns False when it was not in the index."""
        with self._lock, self._write_transaction():
            cursor = self._db.execute(
                "DELETE FROM credentials WHERE nickname = ?", [nickname]
            )
            return bool(cursor.rowcount)

    def _write_rows(self, run_rows: list[Row], event_rows: list[Row]) -> None:
        with self._lock, self._write_transaction():
            if run_rows:
                self._db.executemany(_UPSERT_RUN, run_rows)
            if event_rows:
                self._db.executemany(_INSERT_EVENT, event_rows)

    @contextmanager
    def _write_transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, waiting up to the busy
        # timeout. A deferred transaction that reads first and then writes can
        # fail at once with SQLITE_BUSY when another connection wrote between.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    def _query(self, sql: str, params: list[Any] | None = None) -> list[Row]:
        with self._lock:
            return self._fetch(sql, params)

    def _fetch(self, sql: str, params: list[Any] | None = None) -> list[Row]:
        cursor = self._db.execute(sql, params or [])
        columns = [column[0] for column in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor]


def _select(
    table: str, filters: dict[str, Any], limit: int | None
) -> tuple[str, list[Any]]:
    """Build a newest-first SELECT whose filters with a value of None are left
    out."""
    conditions = [
        condition for condition, value in filters.items() if value is not None
    ]
    params = [value for value in filters.values() if value is not None]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    params.append(-1 if limit is None else limit)
    return f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT ?", params


def _to_run(row: Row) -> RunRecord:
    return msgspec.convert(row, RunRecord)


def _apply_migrations(conn: sqlite3.Connection, path: Path) -> None:
    latest = len(MIGRATIONS)
    if _user_version(conn) == latest:
        return
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read the version again under the write lock: another process may
        # have migrated the file since the check above.
        current = _user_version(conn)
        if current > latest:
            raise StoreError(
                f"The database at {path} has schema version {current}, but this "
                f"runvisor knows versions up to {latest}. Run a newer runvisor "
                "or point [runvisor] data_dir at another folder."
            )
        for number in range(current + 1, latest + 1):
            logger.info(
                "Migrating the database at %s to schema version %d", path, number
            )
            MIGRATIONS[number - 1](db)
        # PRAGMA takes no bound parameters, and `latest` is an int.
        db.execute(f"PRAGMA user_version = {latest}")
    except BaseException:
        db.rollback()
        raise
    db.commit()


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _open_error(path: Path, exc: BaseException) -> StoreError:
    # OperationalError (locked, read-only, disk full, cannot open) is the
    # file system's; the other DatabaseErrors mean the content is damaged.
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError
    ):
        return StoreError(
            f"Cannot open the database at {path}: {exc}. The file is damaged "
            "or is not a runvisor database: move it aside (the daemon then "
            "starts a new history) or restore it from a backup."
        )
    return StoreError(
        f"Cannot open the database at {path}: {exc}. Check that the data dir "
        "is writable and its disk is not full, or set [runvisor] data_dir to "
        "another folder."
    )
