"""Tests of run history on real SQLite files.

Benchmark note, not asserted: on a 2-core AMD EPYC virtual machine (Python
3.11.7, SQLite 3.40.1, sqlite-utils 4.2.1, ext4), 10,000 run rows through
`Store.put_run`, the writer task and `flush` took 0.13 to 0.14 s. The same
rows as 10,000 single-row `Database.write_batch` calls took 1.6 s, and
3.9 s when each call went through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils
import trio

from supervisor import database as store_module
from supervisor.database import LOST_REASON, Database, format_timestamp
from supervisor.errors import StoreError
from supervisor.model import RunEvent, RunRecord, RunStatus, RunTrigger
from supervisor.store import Store

T0 = datetime(2026, 12, 4, 17, 0, 0, tzinfo=UTC)


def run(
    run_id: int,
    project: str = "web",
    *,
    status: RunStatus = RunStatus.SUCCEEDED,
    minutes: int | None = None,
    fire_time: datetime | None = None,
) -> RunRecord:
    started = T0 + timedelta(minutes=run_id if minutes is None else minutes)
    return RunRecord(
        id=run_id,
        project=project,
        trigger=RunTrigger.SCHEDULE if fire_time else RunTrigger.MANUAL,
        status=status,
        started_at=started,
        ended_at=None
        if status is RunStatus.RUNNING
        else started + timedelta(seconds=3),
        pid=1000 + run_id,
        exit_code=None if status is RunStatus.RUNNING else 0,
        fire_time=fire_time,
    )


def event(
    project: str = "web", run_id: int | None = 1, kind: str = "state", minutes: int = 0
) -> RunEvent:
    return RunEvent(
        project=project,
        kind=kind,
        at=T0 + timedelta(minutes=minutes),
        run_id=run_id,
        detail=f"{kind} of {run_id}",
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "runvisor.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database.open(db_path)
    yield database
    database.close()


def count_rows(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


# Database


def test_open_creates_folder_in_wal_mode(db_path: Path) -> None:
    Database.open(db_path).close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Use the common umask 022, which leaves new files readable by all."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_database_files_are_private(db_path: Path) -> None:
    database = Database.open(db_path)
    try:
        database.write_batch([run(1)], [])
        wal = db_path.with_name("runvisor.db-wal")
        shm = db_path.with_name("runvisor.db-shm")

        assert mode(db_path) == 0o600
        assert mode(wal) == 0o600
        assert mode(shm) == 0o600
    finally:
        database.close()


@pytest.mark.usefixtures("open_umask")
def test_open_narrows_mode_of_old_database(db_path: Path) -> None:
    Database.open(db_path).close()
    # A second connection keeps the -wal and -shm files while the database
    # opens again.
    holder = sqlite3.connect(db_path)
    try:
        holder.execute("SELECT count(*) FROM runs").fetchone()
        wal = db_path.with_name("runvisor.db-wal")
        shm = db_path.with_name("runvisor.db-shm")
        files = [db_path, wal, shm]
        for path in files:
            path.chmod(0o644)

        Database.open(db_path).close()

        assert [mode(path) for path in files] == [0o600] * 3
    finally:
        holder.close()


def test_run_round_trips_every_field(db: Database) -> None:
    record = RunRecord(
        id=7,
        project="report",
        trigger=RunTrigger.CATCH_UP,
        status=RunStatus.FAILED,
        started_at=datetime(2026, 3, 29, 1, 59, 59, 999000, tzinfo=UTC),
        ended_at=datetime(2026, 3, 29, 3, 0, 1, 5000, tzinfo=UTC),
        pid=4242,
        exit_code=3,
        signal=15,
        reason="exited with code 3",
        fire_time=datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
    )
    db.write_batch([record], [])
    assert db.get_run(7) == record
    assert db.get_run(8) is None


def test_timestamps_stored_utc_to_millisecond(db: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    record = RunRecord(
        id=1,
        project="web",
        trigger=RunTrigger.MANUAL,
        status=RunStatus.RUNNING,
        started_at=datetime(2026, 7, 1, 14, 0, 0, 123456, tzinfo=plus_two),
    )
    db.write_batch([record], [])
    stored = db.get_run(1)
    assert stored is not None
    assert stored.started_at == datetime(2026, 7, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert format_timestamp(stored.started_at) == "2026-07-01T12:00:00.123Z"


def test_naive_timestamp_is_rejected(db: Database) -> None:
    naive = RunRecord(
        id=1,
        project="web",
        trigger=RunTrigger.MANUAL,
        status=RunStatus.RUNNING,
        started_at=datetime(2026, 1, 1),
    )
    with pytest.raises(ValueError, match="no time zone"):
        db.write_batch([naive], [])


def test_write_batch_upserts_runs_by_id(db: Database) -> None:
    db.write_batch([run(1, status=RunStatus.RUNNING)], [])
    db.write_batch([run(1, status=RunStatus.SUCCEEDED)], [])
    assert [r.status for r in db.history()] == [RunStatus.SUCCEEDED]


def test_history_filters_and_orders_newest_first(db: Database) -> None:
    runs = [run(i, "web" if i % 2 else "db") for i in range(1, 11)]
    runs[8] = run(9, "web", status=RunStatus.FAILED)
    db.write_batch(runs, [])

    assert [r.id for r in db.history()] == list(range(10, 0, -1))
    assert [r.id for r in db.history("web")] == [9, 7, 5, 3, 1]
    assert [r.id for r in db.history("web", limit=2)] == [9, 7]
    assert [r.id for r in db.history(status=RunStatus.FAILED)] == [9]
    since = T0 + timedelta(minutes=8)
    assert [r.id for r in db.history(since=since)] == [10, 9, 8]
    assert [r.id for r in db.history("db", since=since, limit=None)] == [10, 8]
    assert db.history("nobody") == []


def test_events_filter_by_project_and_run(db: Database) -> None:
    events = [
        event("web", 1, "started", 1),
        event("web", 2, "started", 2),
        event("db", 3, "started", 3),
        event("web", None, "skipped", 4),
    ]
    db.write_batch([], events)

    assert db.events() == events[::-1]
    assert db.events("web") == [events[3], events[1], events[0]]
    assert db.events(run_id=2) == [events[1]]
    assert db.events("web", limit=1) == [events[3]]


def test_last_fire_time_is_max_of_project(db: Database) -> None:
    db.write_batch(
        [
            run(1, "nightly", fire_time=T0),
            run(2, "nightly", fire_time=T0 + timedelta(days=1)),
            run(3, "nightly"),
            run(4, "other", fire_time=T0 + timedelta(days=5)),
        ],
        [],
    )
    assert db.last_fire_time("nightly") == T0 + timedelta(days=1)
    assert db.last_fire_time("never-ran") is None


def test_last_runs_holds_newest_run_per_project(db: Database) -> None:
    db.write_batch([run(1, "a"), run(2, "b"), run(3, "a"), run(4, "c")], [])
    latest = db.last_runs()
    assert {name: r.id for name, r in latest.items()} == {"a": 3, "b": 2, "c": 4}


def test_max_run_id_survives_pruning_newest(db: Database) -> None:
    assert db.max_run_id() == 0
    db.write_batch([run(1, "a"), run(2, "b")], [])
    assert db.max_run_id() == 2
    assert db.prune("b", keep=0) == [2]
    assert db.max_run_id() == 2


def test_mark_lost_ends_running_rows(db: Database) -> None:
    db.write_batch(
        [
            run(1, status=RunStatus.SUCCEEDED),
            run(2, status=RunStatus.RUNNING),
            run(3, "db", status=RunStatus.RUNNING),
        ],
        [],
    )
    now = T0 + timedelta(hours=1)

    lost = db.mark_lost(now)

    assert [r.id for r in lost] == [2, 3]
    assert [r.pid for r in lost] == [1002, 1003]
    for record in lost:
        assert record.status is RunStatus.LOST
        assert record.ended_at == now
        assert record.reason == LOST_REASON
        assert db.get_run(record.id) == record
    first = db.get_run(1)
    assert first is not None
    assert first.status is RunStatus.SUCCEEDED
    assert db.mark_lost(now) == []


def test_prune_keeps_newest_runs_and_their_events(db: Database) -> None:
    db.write_batch(
        [run(i, "web") for i in range(1, 11)] + [run(11, "db"), run(12, "db")],
        [event("web", i, minutes=i) for i in range(1, 11)]
        + [
            event("db", 11, minutes=11),
            event("web", None, "skipped", minutes=0),
            event("web", None, "skipped", minutes=9),
        ],
    )

    deleted = db.prune("web", keep=3)

    assert deleted == [1, 2, 3, 4, 5, 6, 7]
    assert [r.id for r in db.history("web")] == [10, 9, 8]
    assert {e.run_id for e in db.events("web")} == {8, 9, 10, None}
    # Run-less events older than the oldest kept run go with the old runs.
    assert [e.at for e in db.events("web") if e.run_id is None] == [
        T0 + timedelta(minutes=9)
    ]
    assert [r.id for r in db.history("db")] == [12, 11]
    assert len(db.events("db")) == 1
    assert db.prune("web", keep=3) == []


def test_prune_never_deletes_running_run(db: Database) -> None:
    db.write_batch([run(1), run(2, status=RunStatus.RUNNING), run(3)], [])
    assert db.prune("web", keep=0) == [1, 3]
    assert [r.id for r in db.history()] == [2]
    with pytest.raises(ValueError, match="keep"):
        db.prune("web", keep=-1)


def test_migrations_apply_once_across_reopens(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Database.open(db_path)
    first.write_batch([run(1)], [])
    latest = len(store_module.MIGRATIONS)
    assert first.schema_version() == latest
    first.close()

    calls: list[int] = []

    def add_column(db: sqlite_utils.Database) -> None:
        calls.append(1)
        db.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    monkeypatch.setattr(
        store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_column]
    )
    for _ in range(3):
        reopened = Database.open(db_path)
        assert reopened.schema_version() == latest + 1
        assert [r.id for r in reopened.history()] == [1]
        reopened.close()
    assert calls == [1]


def test_newer_schema_is_rejected(db_path: Path) -> None:
    Database.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Database.open(db_path)


def test_unwritable_data_dir_raises_store_error(tmp_path: Path) -> None:
    # A file where the data dir should be; chmod alone does not stop root.
    blocker = tmp_path / "data"
    blocker.write_text("")
    path = blocker / "runvisor.db"
    with pytest.raises(StoreError) as caught:
        Database.open(path)
    message = str(caught.value)
    assert f"Cannot open the database at {path}:" in message
    assert "data dir" in message


def test_non_database_file_raises_store_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match=str(db_path)):
        Database.open(db_path)


def test_database_works_from_another_thread(db: Database) -> None:
    errors: list[BaseException] = []

    def use_from_thread() -> None:
        try:
            db.write_batch([run(1)], [])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=use_from_thread)
    thread.start()
    thread.join()
    assert errors == []
    assert [r.id for r in db.history()] == [1]


def test_two_thread_connections_lose_nothing(db_path: Path) -> None:
    databases = [Database.open(db_path) for _ in range(2)]
    errors: list[BaseException] = []

    def write_runs(database: Database, first_id: int) -> None:
        try:
            for run_id in range(first_id, first_id + 300):
                database.write_batch([run(run_id)], [event(run_id=run_id)])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [
        threading.Thread(target=write_runs, args=(database, 1 + 1000 * index))
        for index, database in enumerate(databases)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for database in databases:
        database.close()

    assert errors == []
    assert count_rows(db_path, "runs") == 600
    assert count_rows(db_path, "events") == 600


# Store


async def test_store_writer_commits_10000_rows(db_path: Path) -> None:
    store = Store.open(db_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.writer)
        for _ in range(10_000):
            run_id = store.next_run_id()
            store.put_run(run(run_id, status=RunStatus.RUNNING))
            store.put_run(run(run_id, status=RunStatus.SUCCEEDED))
            store.put_event(event(run_id=run_id))
        await store.flush()
        nursery.cancel_scope.cancel()

    assert count_rows(db_path, "runs") == 10_000
    assert count_rows(db_path, "events") == 10_000
    statuses = {r.status for r in await store.history(limit=None)}
    assert statuses == {RunStatus.SUCCEEDED}
    assert store.failed_writes == 0
    store.close()


async def test_next_run_id_continues_after_stored_runs(db_path: Path) -> None:
    database = Database.open(db_path)
    database.write_batch([run(41)], [])
    store = Store(database)
    assert store.next_run_id() == 42
    assert store.next_run_id() == 43
    store.close()


async def test_flush_without_queued_rows_returns_at_once(db_path: Path) -> None:
    store = Store.open(db_path)
    with trio.fail_after(1):
        await store.flush()
    store.close()


async def test_flush_waits_until_rows_are_committed(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.store")
    store = Store(
        Database.open(db_path, busy_timeout=0.01),
        retry_delay=0.01,
        max_retry_delay=0.02,
    )
    # Another process holds the write lock, as a busy CLI or a stuck
    # transaction would.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    async with trio.open_nursery() as nursery:
        await nursery.start(store.writer)
        store.put_run(run(1))
        store.put_event(event(run_id=1))

        with trio.move_on_after(0.3) as waited:
            await store.flush()
        assert waited.cancelled_caught
        assert count_rows(db_path, "runs") == 0

        blocker.execute("ROLLBACK")
        blocker.close()
        with trio.fail_after(5):
            await store.flush()
        nursery.cancel_scope.cancel()

    assert count_rows(db_path, "runs") == 1
    assert count_rows(db_path, "events") == 1
    # Many attempts failed, but the error was logged once.
    assert store.failed_writes >= 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "retried" in errors[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)
    store.close()


async def test_cancelled_writer_writes_queued_rows(db_path: Path) -> None:
    store = Store.open(db_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.writer)
        for run_id in range(1, 101):
            store.put_run(run(run_id))
        # Cancel before the writer task runs again: only its shielded
        # shutdown write can save these rows.
        nursery.cancel_scope.cancel()

    assert count_rows(db_path, "runs") == 100
    store.close()


async def test_store_reads_and_maintenance(db_path: Path) -> None:
    store = Store.open(db_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.writer)
        store.put_run(run(1, "nightly", fire_time=T0))
        store.put_run(run(2, "nightly", status=RunStatus.RUNNING))
        store.put_run(run(3, "web"))
        store.put_event(event("web", 3))
        await store.flush()
        nursery.cancel_scope.cancel()

    assert [r.id for r in await store.history("nightly")] == [2, 1]
    assert await store.get_run(3) == run(3, "web")
    assert await store.events(run_id=3) == [event("web", 3)]
    assert await store.last_fire_time("nightly") == T0
    assert set(await store.last_runs()) == {"nightly", "web"}
    lost = await store.mark_lost(T0 + timedelta(hours=1))
    assert [r.id for r in lost] == [2]
    assert await store.prune("nightly", keep=1) == [1]
    assert [r.id for r in await store.history("nightly")] == [2]
    store.close()


async def test_put_rejects_naive_timestamp_at_once(db_path: Path) -> None:
    store = Store.open(db_path)
    naive_event = RunEvent(project="web", kind="state", at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="no time zone"):
        store.put_event(naive_event)
    with trio.fail_after(1):
        await store.flush()
    store.close()


def test_credential_index_round_trip(db_path: Path) -> None:
    db = Database.open(db_path)
    later = T0 + timedelta(minutes=5)

    assert db.add_credential("notion", "Notion API key", T0)
    assert db.add_credential("db-pass", "", T0)
    assert not db.add_credential("notion", "again", later)
    assert db.update_credential("notion", None, later)
    assert db.update_credential("db-pass", "database password", later)
    assert not db.update_credential("missing", "x", later)

    listed = db.credentials()
    assert [entry.nickname for entry in listed] == ["db-pass", "notion"]
    notion = db.get_credential("notion")
    assert notion is not None
    assert notion.description == "Notion API key"
    assert notion.created_at == T0
    assert notion.updated_at == later
    assert listed[0].description == "database password"

    assert db.delete_credential("notion")
    assert not db.delete_credential("notion")
    assert db.get_credential("notion") is None
    db.close()


def test_credential_index_is_shared_between_connections(db_path: Path) -> None:
    daemon_side = Database.open(db_path)
    cli_side = Database.open(db_path)
    cli_side.add_credential("token", "", T0)
    assert [entry.nickname for entry in daemon_side.credentials()] == ["token"]
    daemon_side.close()
    cli_side.close()
