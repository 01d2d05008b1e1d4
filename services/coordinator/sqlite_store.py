"""The embedded task store: SQLite in WAL mode behind one thread.

One coordinator, one file, nothing else to run. It implements
:class:`~hivewire.services.coordinator.store.TaskStore`.

Every task is one row (indexed columns plus the serialized ``Task``) and every task
event one row keyed by ``(task_id, sequence)``. Results, errors and attempts travel
inside the serialized task; idempotency keys are a unique index on
``(owner, idempotency_key)``.

One dedicated thread owns the only connection. Writes are queued and committed in
batches (group commit): whatever piled up while the previous transaction ran goes
into the next one, so a burst of events costs one commit, not one per event. Reads
go through the same queue, so a read issued after a write sees it.

Durability: WAL with ``synchronous=NORMAL`` makes a committed transaction survive a
crash of the process (``kill -9``); only an operating system crash or power loss
can drop the last transactions. A write's future resolves once its transaction has
committed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hivewire.services.base.lifecycle import OpenClose
from hivewire.services.coordinator import store

logger = logging.getLogger(__name__)

__all__ = ["SqliteTaskStore", "all_rows", "first_row"]

T = TypeVar("T")


_SCHEMA_VERSION = 4
_WAL_SIZE_LIMIT = 16 * 1024 * 1024
"""Bytes of the WAL file kept after a checkpoint."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id         TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    capability      TEXT NOT NULL,
    state           INTEGER NOT NULL,
    priority        INTEGER NOT NULL,
    created_ns      INTEGER NOT NULL,
    updated_ns      INTEGER NOT NULL,
    deadline_ns     INTEGER NOT NULL,
    idempotency_key TEXT,
    not_before_ns   INTEGER NOT NULL DEFAULT 0,
    last_sequence   INTEGER NOT NULL DEFAULT 0,
    spec            BLOB NOT NULL,
    data            BLOB NOT NULL,
    parent_task_id  TEXT NOT NULL DEFAULT '',
    project_id      TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_ns DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_owner_created ON tasks (owner, created_ns DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_active ON tasks (state) WHERE state NOT IN (5, 6, 7, 8);
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    data       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    task_id  TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (task_id, sequence)
) WITHOUT ROWID;
"""

# Indexes on the columns added in schema version 2 (created after the migration).
_SCHEMA_V2_INDEXES = """
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks (parent_task_id, created_ns)
    WHERE parent_task_id != '';
CREATE INDEX IF NOT EXISTS tasks_project ON tasks (project_id, created_ns DESC)
    WHERE project_id != '';
"""
# Schema version 3: tombstones of purged tasks, and the index the purge walks.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS purged_tasks (
    task_id   TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    purged_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS purged_tasks_age ON purged_tasks (purged_ns);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (updated_ns) WHERE state IN (5, 6, 7, 8);
"""
# Schema version 4: the event outbox (coordinator/outbox.py). AUTOINCREMENT: a position
# is never reused, even after the table was emptied, so "after position" stays right.
_SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    entry    BLOB NOT NULL
);
"""
_MIGRATE_V1 = (
    "ALTER TABLE tasks ADD COLUMN parent_task_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE tasks ADD COLUMN project_id TEXT NOT NULL DEFAULT ''",
)

_TASK_COLUMNS = (
    "task_id, owner, capability, state, priority, created_ns, updated_ns, deadline_ns, "
    "idempotency_key, not_before_ns, last_sequence, spec, data, parent_task_id, project_id"
)
_UPSERT_TASK = f"""
INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET
    state = excluded.state, priority = excluded.priority, updated_ns = excluded.updated_ns,
    deadline_ns = excluded.deadline_ns, not_before_ns = excluded.not_before_ns,
    last_sequence = excluded.last_sequence, data = excluded.data
"""  # noqa: S608 - column list is a constant
_INSERT_EVENT = "INSERT INTO events (task_id, sequence, data) VALUES (?, ?, ?)"


@dataclass
class _Write:
    tasks: Sequence[store.TaskRow]
    events: Sequence[store.EventRow]
    future: asyncio.Future[None]
    outbox_done: int = 0  # delete the outbox rows up to this position (0: none)


@dataclass
class _Read:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_STOP = object()

_OUTBOX_RECENT_MAX = 10_000
"""Committed outbox entries kept in memory for the relay; a relay further behind (NATS
away) reads the rest from the table."""
_OUTBOX_RECENT_BYTES = 16 * 1024 * 1024
"""The same bound in bytes of entries (an entry holds up to 64 KiB of event copy)."""


class SqliteTaskStore(OpenClose):
    """The embedded SQLite task store (an async context manager).

    Args:
        path: Database file; its directory is created. ``":memory:"`` keeps nothing.
        batch_max: Most write requests committed in one transaction.
    """

    def __init__(self, path: Path | str, *, batch_max: int = 1000) -> None:
        self._path = str(path)
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._outbox_committed = asyncio.Event()
        # Every committed outbox entry past _outbox_floor, in commit order, as the storage
        # thread hands them over: the relay takes them from here, not by a query per
        # round. Its own thread's count of positions: _outbox_position.
        self._outbox_recent: deque[store.OutboxItem] = deque()
        self._outbox_recent_bytes = 0
        self._outbox_floor = 0
        self._outbox_position = 0

    @property
    def path(self) -> str:
        """The database path."""
        return self._path

    async def open(self) -> None:
        """Create or open the database and start the storage thread.

        Raises:
            StoreError: The database cannot be opened or has a newer schema.
        """
        if self._thread is not None:
            raise store.StoreError("store already open")
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="coordinator-store", daemon=True
        )
        self._thread.start()
        await ready
        logger.info("task store open at %s", self._path)

    async def close(self) -> None:
        """Commit what is queued and stop the storage thread (idempotent)."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        self._closed = True
        self._queue.put(_STOP)
        thread = self._thread
        await asyncio.to_thread(thread.join)

    # -- writes ----------------------------------------------------------------------

    def put(
        self, *, tasks: Sequence[store.TaskRow] = (), events: Sequence[store.EventRow] = ()
    ) -> asyncio.Future[None]:
        """Queue task upserts and event inserts for the next transaction.

        Does not block: the returned future resolves when the transaction that holds
        them has committed (or fails with :class:`StoreError`). Writes commit in the
        order they were queued.

        Args:
            tasks: Task rows to insert or update.
            events: Event rows to insert.

        Returns:
            The commit future; callers that do not need to wait may ignore it.
        """
        loop = self._require_open()
        future: asyncio.Future[None] = loop.create_future()
        # A write nobody awaits must not log "exception never retrieved" on failure:
        # failures are logged by the storage thread already.
        future.add_done_callback(store.consume_exception)
        self._queue.put(_Write(tasks, events, future))
        return future

    async def flush(self) -> None:
        """Wait until every write queued so far has committed."""
        await self._read(lambda conn: None)

    # -- reads -----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> store.TaskRow | None:
        """Return a task's row, or None when it does not exist."""
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = ?"  # noqa: S608
        return await self._read_one(_row_from_db, sql, task_id)

    async def find_by_idempotency_key(self, owner: str, key: str) -> store.TaskRow | None:
        """Return the task an owner submitted with an idempotency key, if any."""
        sql = (
            f"SELECT {_TASK_COLUMNS} FROM tasks "  # noqa: S608
            "WHERE owner = ? AND idempotency_key = ?"
        )
        return await self._read_one(_row_from_db, sql, owner, key)

    async def active_tasks(self) -> list[store.TaskRow]:
        """Every task not in a terminal state, oldest first (for recovery)."""
        sql = (
            f"SELECT {_TASK_COLUMNS} FROM tasks "  # noqa: S608
            "WHERE state NOT IN (5, 6, 7, 8) ORDER BY created_ns, task_id"
        )
        return await self._read_all(_row_from_db, sql)

    async def list_tasks(self, query: store.TaskQuery) -> list[store.TaskRow]:
        """Tasks matching a query, newest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if query.states:
            clauses.append(f"state IN ({', '.join('?' * len(query.states))})")
            params.extend(query.states)
        for column, value in (
            ("capability", query.capability),
            ("owner", query.owner),
            ("parent_task_id", query.parent_task_id),
            ("project_id", query.project_id),
        ):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.before is not None:
            clauses.append("(created_ns < ? OR (created_ns = ? AND task_id < ?))")
            params.extend((query.before[0], query.before[0], query.before[1]))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {_TASK_COLUMNS} FROM tasks {where} "  # noqa: S608 - placeholders only
            "ORDER BY created_ns DESC, task_id DESC LIMIT ?"
        )
        return await self._read_all(_row_from_db, sql, *params, max(query.limit, 0))

    async def children(self, parent_task_id: str) -> list[store.TaskRow]:
        """Every step and sub-task of a task, oldest first."""
        sql = (
            f"SELECT {_TASK_COLUMNS} FROM tasks "  # noqa: S608
            "WHERE parent_task_id = ? ORDER BY created_ns, task_id"
        )
        return await self._read_all(_row_from_db, sql, parent_task_id)

    # -- projects --------------------------------------------------------------------

    async def put_project(self, project: store.ProjectRow) -> None:
        """Store a new project (durably)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO projects (project_id, owner, created_ns, data) VALUES (?, ?, ?, ?)",
                (project.project_id, project.owner, project.created_ns, project.data),
            )

        await self._read(run)

    async def get_project(self, project_id: str) -> store.ProjectRow | None:
        """A project's row, or None."""
        sql = "SELECT project_id, owner, created_ns, data FROM projects WHERE project_id = ?"
        return await self._read_one(_project_from_db, sql, project_id)

    async def list_projects(
        self, *, owner: str, before: tuple[int, str] | None, limit: int
    ) -> list[store.ProjectRow]:
        """Projects newest first, of one owner ("" for all)."""
        clauses: list[str] = []
        params: list[Any] = []
        if owner:
            clauses.append("owner = ?")
            params.append(owner)
        if before is not None:
            clauses.append("(created_ns < ? OR (created_ns = ? AND project_id < ?))")
            params.extend((before[0], before[0], before[1]))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT project_id, owner, created_ns, data FROM projects {where} "  # noqa: S608
            "ORDER BY created_ns DESC, project_id DESC LIMIT ?"
        )
        return await self._read_all(_project_from_db, sql, *params, max(limit, 0))

    async def project_summary(self, project_id: str) -> store.ProjectSummary:
        """Aggregates over a project's tasks."""

        def run(conn: sqlite3.Connection) -> store.ProjectSummary:
            counts = {
                int(state): int(n)
                for state, n in conn.execute(
                    "SELECT state, COUNT(*) FROM tasks WHERE project_id = ? GROUP BY state",
                    (project_id,),
                ).fetchall()
            }
            # Usage rolls up into each tree's root (a plan sums its steps, a task its
            # sub-tasks), so only roots are read.
            rows = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks "  # noqa: S608
                "WHERE project_id = ? AND parent_task_id = '' ORDER BY created_ns",
                (project_id,),
            ).fetchall()
            return store.ProjectSummary(counts, [_row_from_db(r) for r in rows])

        result: store.ProjectSummary = await self._read(run)
        return result

    async def events_after(
        self, task_id: str, after: int, *, until: int | None = None, limit: int = 1000
    ) -> list[store.EventRow]:
        """A task's events with ``after < sequence <= until``, in order.

        Args:
            task_id: The task.
            after: Exclusive lower bound of the sequence.
            until: Inclusive upper bound; None means no bound.
            limit: At most this many events.
        """
        sql = (
            "SELECT sequence, data FROM events WHERE task_id = ? AND sequence > ? "
            "AND sequence <= ? ORDER BY sequence LIMIT ?"
        )
        bound = until if until is not None else 2**62

        def event(row: Sequence[Any]) -> store.EventRow:
            return store.EventRow(task_id, row[0], bytes(row[1]))

        return await self._read_all(event, sql, task_id, after, bound, limit)

    async def last_sequence(self, task_id: str) -> int:
        """The sequence of a task's latest stored event (0 when it has none)."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT MAX(sequence) FROM events WHERE task_id = ?", (task_id,)
            ).fetchone()
            return int(row[0] or 0)

        result: int = await self._read(run)
        return result

    async def count_tasks(self) -> int:
        """How many tasks are stored."""

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

        result: int = await self._read(run)
        return result

    # -- retention -------------------------------------------------------------------

    async def release_idempotency_key(self, owner: str, key: str, task_id: str) -> None:
        """Take an expired idempotency key off the task that holds it (durably)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE tasks SET idempotency_key = NULL "
                "WHERE owner = ? AND idempotency_key = ? AND task_id = ?",
                (owner, key, task_id),
            )

        await self._read(run)

    async def purge_finished(self, before_ns: int, *, limit: int, now: int) -> int:
        """Delete up to ``limit`` tasks finished before ``before_ns``, leave tombstones.

        One transaction: the oldest finished tasks (by the ``tasks_finished`` index),
        their events (a range of the events' primary key each), then the task rows.
        Freed pages are reused by new writes, so a store at steady state stops growing.
        """

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                victims = conn.execute(
                    "SELECT task_id, owner FROM tasks WHERE state IN (5, 6, 7, 8) "
                    "AND updated_ns < ? ORDER BY updated_ns LIMIT ?",
                    (before_ns, limit),
                ).fetchall()
                if victims:
                    conn.executemany(
                        "INSERT OR REPLACE INTO purged_tasks (task_id, owner, purged_ns) "
                        "VALUES (?, ?, ?)",
                        [(task_id, owner, now) for task_id, owner in victims],
                    )
                    ids = [(task_id,) for task_id, _ in victims]
                    conn.executemany("DELETE FROM events WHERE task_id = ?", ids)
                    conn.executemany("DELETE FROM tasks WHERE task_id = ?", ids)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return len(victims)

        result: int = await self._read(run)
        return result

    async def prune_tombstones(self, before_ns: int, *, limit: int) -> int:
        """Delete up to ``limit`` tombstones made before ``before_ns``; how many."""

        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM purged_tasks WHERE task_id IN (SELECT task_id FROM purged_tasks "
                "WHERE purged_ns < ? ORDER BY purged_ns LIMIT ?)",
                (before_ns, limit),
            )
            return int(cursor.rowcount)

        result: int = await self._read(run)
        return result

    async def tombstone(self, task_id: str) -> store.Tombstone | None:
        """The tombstone of a purged task, or None."""
        sql = "SELECT task_id, owner, purged_ns FROM purged_tasks WHERE task_id = ?"
        return await self._read_one(lambda row: store.Tombstone(*row), sql, task_id)

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]:
        """Delete finished tasks and their events (durably); returns the ids deleted."""
        wanted = list(dict.fromkeys(task_ids))

        def run(conn: sqlite3.Connection) -> list[str]:
            deleted: list[str] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for task_id in wanted:
                    cursor = conn.execute(
                        "DELETE FROM tasks WHERE task_id = ? AND state IN (5, 6, 7, 8)",
                        (task_id,),
                    )
                    if cursor.rowcount:
                        conn.execute("DELETE FROM events WHERE task_id = ?", (task_id,))
                        deleted.append(task_id)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return deleted

        result: list[str] = await self._read(run)
        return result

    # -- the event outbox ------------------------------------------------------------

    async def outbox_next(self, after: int, *, limit: int) -> list[store.OutboxItem]:
        """Committed outbox entries with a position past ``after``, oldest first.

        Waits until there is at least one (the storage thread signals each commit that
        wrote outbox rows). Entries committed by this store since it opened come from
        memory; older ones (a restarted relay, a relay far behind) from the table.
        """

        def run(conn: sqlite3.Connection) -> list[store.OutboxItem]:
            rows = conn.execute(
                "SELECT position, entry FROM outbox WHERE position > ? ORDER BY position LIMIT ?",
                (after, limit),
            ).fetchall()
            return [store.OutboxItem(int(position), bytes(entry)) for position, entry in rows]

        while True:
            self._outbox_committed.clear()
            if after >= self._outbox_floor:
                recent = self._outbox_recent
                while recent and recent[0].position <= after:
                    self._outbox_recent_bytes -= len(recent.popleft().entry)
                self._outbox_floor = after
                if recent:
                    return list(itertools.islice(recent, limit))
            else:
                items: list[store.OutboxItem] = await self._read(run)
                if items:
                    return items
            await self._outbox_committed.wait()

    def _outbox_added(self, items: list[store.OutboxItem]) -> None:
        """Take the outbox entries a commit wrote (on the loop, in commit order)."""
        recent = self._outbox_recent
        recent.extend(items)
        self._outbox_recent_bytes += sum(len(item.entry) for item in items)
        if len(recent) > _OUTBOX_RECENT_MAX or self._outbox_recent_bytes > _OUTBOX_RECENT_BYTES:
            # The relay is far behind: it reads up to here from the table.
            self._outbox_floor = recent[-1].position
            recent.clear()
            self._outbox_recent_bytes = 0
        self._outbox_committed.set()

    async def outbox_done(self, position: int) -> None:
        """Delete the outbox entries up to ``position``: they are published.

        A write like the others: it joins the next group commit.
        """
        loop = self._require_open()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Write((), (), future, outbox_done=position))
        await future

    # -- plumbing --------------------------------------------------------------------

    def _require_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None:
            raise store.StoreError("task store is closed")
        return self._loop

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._require_open()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Read(fn, future))
        return await future

    async def _read_one(
        self, build: Callable[[Sequence[Any]], T], sql: str, *args: object
    ) -> T | None:
        return await self._read(lambda conn: first_row(conn, build, sql, *args))

    async def _read_all(
        self, build: Callable[[Sequence[Any]], T], sql: str, *args: object
    ) -> list[T]:
        return await self._read(lambda conn: all_rows(conn, build, sql, *args))

    def _connect(self) -> sqlite3.Connection:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit BEGIN/COMMIT around each batch.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # The WAL is checkpointed every 1000 pages (SQLite's default); a checkpoint after a
        # large transaction (a purge batch) leaves the file that large unless it is cut
        # back: keep at most this much of it.
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            conn.close()
            raise store.StoreError(
                f"{self._path} has schema version {version}; this coordinator knows "
                f"{_SCHEMA_VERSION}"
            )
        if version == 1:
            for statement in _MIGRATE_V1:
                conn.execute(statement)
        conn.executescript(_SCHEMA)
        conn.executescript(_SCHEMA_V2_INDEXES)
        conn.executescript(_SCHEMA_V3)
        conn.executescript(_SCHEMA_V4)
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        # Positions go on from the last one ever used (AUTOINCREMENT's own counter).
        row = conn.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " COALESCE((SELECT MAX(position) FROM outbox), 0))"
        ).fetchone()
        self._outbox_position = self._outbox_floor = int(row[0])
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError, store.StoreError) as exc:
            err = (
                exc
                if isinstance(exc, store.StoreError)
                else store.StoreError(f"cannot open {self._path}: {exc}")
            )
            loop.call_soon_threadsafe(store.settle, ready, None, err)
            return
        loop.call_soon_threadsafe(store.settle, ready, None, None)
        try:
            self._serve(conn, loop)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        carry: object | None = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                return
            if isinstance(item, _Read):
                self._do_read(conn, loop, item)
                continue
            assert isinstance(item, _Write)
            batch = [item]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Write):
                    batch.append(nxt)
                else:
                    # Reads and stop wait for this batch: a read sees earlier writes.
                    carry = nxt
                    break
            self._commit(conn, loop, batch)

    @staticmethod
    def _do_read(conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop, item: _Read) -> None:
        try:
            result = item.fn(conn)
        except sqlite3.Error as exc:
            logger.exception("task store read failed")
            loop.call_soon_threadsafe(store.settle, item.future, None, store.StoreError(str(exc)))
            return
        loop.call_soon_threadsafe(store.settle, item.future, result, None)

    def _commit(
        self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop, batch: list[_Write]
    ) -> None:
        try:
            outbox = self._apply(conn, batch)
            errors: list[BaseException | None] = [None] * len(batch)
        except sqlite3.Error:
            logger.exception(
                "task store batch of %d writes failed; retrying one by one", len(batch)
            )
            # Isolate the bad write so the rest of the batch still commits.
            errors = []
            outbox = []
            for write in batch:
                try:
                    outbox.extend(self._apply(conn, [write]))
                    errors.append(None)
                except sqlite3.Error as exc:
                    logger.error("task store write failed: %s", exc)
                    errors.append(store.StoreError(str(exc)))
        futures = [w.future for w in batch]
        # One wake-up of the loop per batch, outbox entries and all.
        loop.call_soon_threadsafe(self._settle_batch, futures, errors, outbox)

    def _settle_batch(
        self,
        futures: list[asyncio.Future[None]],
        errors: list[BaseException | None],
        outbox: list[store.OutboxItem],
    ) -> None:
        _settle_all(futures, errors)
        if outbox:
            self._outbox_added(outbox)

    def _apply(self, conn: sqlite3.Connection, batch: list[_Write]) -> list[store.OutboxItem]:
        """Commit a batch; the outbox entries it wrote, with their positions."""
        # Several updates of one task in a batch collapse into the last one.
        latest: dict[str, store.TaskRow] = {}
        events: list[tuple[str, int, bytes]] = []
        for write in batch:
            for task in write.tasks:
                latest.pop(task.task_id, None)
                latest[task.task_id] = task
            events.extend((e.task_id, e.sequence, e.data) for e in write.events)
        first = self._outbox_position + 1
        outbox = [
            store.OutboxItem(first + i, entry)
            for i, entry in enumerate(e.outbox for write in batch for e in write.events if e.outbox)
        ]
        published = max((write.outbox_done for write in batch), default=0)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if latest:
                conn.executemany(_UPSERT_TASK, [_row_params(t) for t in latest.values()])
            if events:
                conn.executemany(_INSERT_EVENT, events)
            if outbox:
                # In the events' transaction: an event is never committed without it.
                conn.executemany(
                    "INSERT INTO outbox (position, entry) VALUES (?, ?)",
                    [(item.position, item.entry) for item in outbox],
                )
            if published:
                conn.execute("DELETE FROM outbox WHERE position <= ?", (published,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if outbox:
            self._outbox_position = outbox[-1].position
        return outbox


def _settle_all(futures: list[asyncio.Future[None]], errors: list[BaseException | None]) -> None:
    for future, error in zip(futures, errors, strict=True):
        store.settle(future, None, error)


def _row_params(row: store.TaskRow) -> tuple[Any, ...]:
    return (
        row.task_id,
        row.owner,
        row.capability,
        row.state,
        row.priority,
        row.created_ns,
        row.updated_ns,
        row.deadline_ns,
        row.idempotency_key or None,
        row.not_before_ns,
        row.last_sequence,
        row.spec,
        row.data,
        row.parent_task_id,
        row.project_id,
    )


def first_row(
    conn: sqlite3.Connection, build: Callable[[Sequence[Any]], T], sql: str, *args: object
) -> T | None:
    """The first row a query returns, made into a value by ``build``; None when there is none."""
    row = conn.execute(sql, args).fetchone()
    return None if row is None else build(row)


def all_rows(
    conn: sqlite3.Connection, build: Callable[[Sequence[Any]], T], sql: str, *args: object
) -> list[T]:
    """Every row a query returns, each made into a value by ``build``."""
    return [build(row) for row in conn.execute(sql, args).fetchall()]


def _project_from_db(row: Sequence[Any]) -> store.ProjectRow:
    return store.ProjectRow(row[0], row[1], row[2], bytes(row[3]))


def _row_from_db(row: Sequence[Any]) -> store.TaskRow:
    return store.TaskRow(
        task_id=row[0],
        owner=row[1],
        capability=row[2],
        state=row[3],
        priority=row[4],
        created_ns=row[5],
        updated_ns=row[6],
        deadline_ns=row[7],
        idempotency_key=row[8] or "",
        not_before_ns=row[9],
        last_sequence=row[10],
        spec=bytes(row[11]),
        data=bytes(row[12]),
        parent_task_id=row[13],
        project_id=row[14],
    )
