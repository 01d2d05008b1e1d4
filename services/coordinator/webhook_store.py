"""The durable side of webhooks: registrations and the delivery outbox, in SQLite.

The outbox lives in the coordinator's database file (its own tables, its own
connection), so deliveries that were due when the coordinator stopped are made after
it starts again. Every method is a short SQLite statement run off the event loop.

A registration is a principal's (``project_id`` empty: every task ``owner`` submits) or
a project's (every task of ``project_id``; ``owner`` is the project's owner). Files
written before project webhooks existed get the ``project_id`` columns when opened.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hivewire.services.base.lifecycle import OpenClose
from hivewire.services.coordinator.sqlite_store import all_rows, first_row

__all__ = ["PENDING", "DELIVERED", "DEAD", "DeliveryRow", "SqliteWebhookStore", "WebhookRow"]

T = TypeVar("T")

_CACHED_KEYS = 1024
"""Principals and projects whose registrations are kept in memory (least recently used leave)."""

PENDING = 1
DELIVERED = 2
DEAD = 3
"""``WebhookDeliveryState`` values."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    webhook_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    project_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (owner, created_ns);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    task_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    body BLOB NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    next_at_ns INTEGER NOT NULL,
    project_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_at_ns)
    WHERE state = 1;
CREATE INDEX IF NOT EXISTS webhook_deliveries_owner
    ON webhook_deliveries (owner, created_ns DESC);
"""

# Columns added after the first release: (table, column); created in files that lack them.
_ADDED_COLUMNS = (("webhooks", "project_id"), ("webhook_deliveries", "project_id"))

# Indexes over added columns (made once the columns exist).
_ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS webhooks_project ON webhooks (project_id, created_ns);
CREATE INDEX IF NOT EXISTS webhook_deliveries_project
    ON webhook_deliveries (project_id, created_ns DESC);
"""

_DELIVERY_COLUMNS = (
    "delivery_id, webhook_id, owner, task_id, sequence, event_type, url, secret, body, "
    "state, attempts, last_error, created_ns, next_at_ns, project_id"
)
_WEBHOOK_COLUMNS = "webhook_id, owner, url, secret, created_ns, project_id"


@dataclass(frozen=True)
class WebhookRow:
    """A registered webhook: a principal's, or a project's when ``project_id`` is set."""

    webhook_id: str
    owner: str
    url: str
    secret: str
    created_ns: int
    project_id: str = ""


@dataclass(frozen=True)
class DeliveryRow:
    """One event on its way to one webhook."""

    delivery_id: str
    webhook_id: str
    owner: str
    task_id: str
    sequence: int
    event_type: str
    url: str
    secret: str
    body: bytes
    state: int
    attempts: int
    last_error: str
    created_ns: int
    next_at_ns: int
    project_id: str = ""


class SqliteWebhookStore(OpenClose):
    """Webhook registrations and deliveries in the coordinator's SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self._path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # Registrations by (owner, project), read on every task's end: kept in memory
        # (only this store writes them) so most tasks cost no trip to the database
        # thread. Any change empties it.
        self._registrations: OrderedDict[tuple[str, str], tuple[WebhookRow, ...]] = OrderedDict()
        self._generation = 0  # bumped by every change: a read that raced one is not kept

    async def open(self) -> None:
        """Open the database file (made if missing) and create its tables."""
        await asyncio.to_thread(self._open)

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._lock:
                conn.close()

    def _open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        for table, column in _ADDED_COLUMNS:
            # Only constant names are formatted in.
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        conn.executescript(_ADDED_INDEXES)
        self._conn = conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            conn = self._conn
            if conn is None:
                raise RuntimeError("webhook store is closed")
            with self._lock:
                return fn(conn)

        return await asyncio.to_thread(locked)

    # -- registrations ---------------------------------------------------------------

    def _changed(self) -> None:
        self._generation += 1
        self._registrations.clear()

    async def add_webhook(self, row: WebhookRow) -> None:
        """Store a registration."""
        self._changed()
        try:
            await self._run(
                lambda c: c.execute(
                    f"INSERT INTO webhooks ({_WEBHOOK_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        row.webhook_id,
                        row.owner,
                        row.url,
                        row.secret,
                        row.created_ns,
                        row.project_id,
                    ),
                )
            )
        finally:
            # Again once written: a read that ran meanwhile may have seen either.
            self._changed()

    async def webhooks_of(self, owner: str, *, project_id: str = "") -> list[WebhookRow]:
        """A principal's registrations, or with ``project_id`` a project's; oldest first."""
        key = ("", project_id) if project_id else (owner, "")
        cached = self._registrations.get(key)
        if cached is not None:
            self._registrations.move_to_end(key)
            return list(cached)
        generation = self._generation
        if project_id:
            where, value = "project_id = ?", project_id
        else:
            where, value = "owner = ? AND project_id = ''", owner

        sql = (
            f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE {where} "  # noqa: S608
            "ORDER BY created_ns, webhook_id"
        )
        found = await self._run(lambda c: all_rows(c, _webhook, sql, value))
        if generation == self._generation:
            self._registrations[key] = tuple(found)
            while len(self._registrations) > _CACHED_KEYS:
                self._registrations.popitem(last=False)
        return found

    async def webhook(self, webhook_id: str) -> WebhookRow | None:
        """One registration by id, or None."""
        sql = f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE webhook_id = ?"  # noqa: S608
        return await self._run(lambda c: first_row(c, _webhook, sql, webhook_id))

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Remove a registration; False when there is none with that id."""

        def run(c: sqlite3.Connection) -> bool:
            cursor = c.execute("DELETE FROM webhooks WHERE webhook_id = ?", (webhook_id,))
            return cursor.rowcount > 0

        self._changed()
        try:
            return await self._run(run)
        finally:
            self._changed()

    # -- deliveries ------------------------------------------------------------------

    async def add_deliveries(self, rows: Sequence[DeliveryRow]) -> None:
        """Queue deliveries; one already queued (same id) is left as it is."""
        params = [
            (
                r.delivery_id,
                r.webhook_id,
                r.owner,
                r.task_id,
                r.sequence,
                r.event_type,
                r.url,
                r.secret,
                r.body,
                r.state,
                r.attempts,
                r.last_error,
                r.created_ns,
                r.next_at_ns,
                r.project_id,
            )
            for r in rows
        ]
        await self._run(
            lambda c: c.executemany(
                # Only constant column names are formatted in; values are parameters.
                f"INSERT OR IGNORE INTO webhook_deliveries ({_DELIVERY_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params,
            )
        )

    async def due(self, now_ns: int, limit: int) -> list[DeliveryRow]:
        """Pending deliveries whose next attempt is due, the most overdue first."""
        sql = (
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries "  # noqa: S608
            "WHERE state = 1 AND next_at_ns <= ? ORDER BY next_at_ns LIMIT ?"
        )
        return await self._run(lambda c: all_rows(c, _delivery, sql, now_ns, limit))

    async def next_due_ns(self) -> int | None:
        """When the next pending delivery is due, or None when none is pending."""

        def run(c: sqlite3.Connection) -> int | None:
            row = c.execute(
                "SELECT MIN(next_at_ns) FROM webhook_deliveries WHERE state = 1"
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._run(run)

    async def record_attempt(
        self, delivery_id: str, *, state: int, attempts: int, last_error: str, next_at_ns: int
    ) -> None:
        """Store the outcome of an attempt."""
        await self._run(
            lambda c: c.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = ?, last_error = ?, "
                "next_at_ns = ? WHERE delivery_id = ?",
                (state, attempts, last_error, next_at_ns, delivery_id),
            )
        )

    async def deliveries(
        self, *, owner: str, state: int, task_id: str, limit: int, project_id: str = ""
    ) -> list[DeliveryRow]:
        """Deliveries newest first; "" / 0 filters mean all (owner "" = every owner)."""
        where: list[str] = []
        params: list[str | int] = []
        filters = (("owner", owner), ("task_id", task_id), ("state", state))
        for column, value in (*filters, ("project_id", project_id)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)} " if where else ""

        sql = (
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {clause}"  # noqa: S608
            "ORDER BY created_ns DESC, delivery_id LIMIT ?"
        )
        return await self._run(lambda c: all_rows(c, _delivery, sql, *params, limit))


def _webhook(row: Sequence[Any]) -> WebhookRow:
    return WebhookRow(*row)


def _delivery(row: Sequence[Any]) -> DeliveryRow:
    return DeliveryRow(*row)
