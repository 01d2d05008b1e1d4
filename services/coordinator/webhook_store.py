"""The durable side of webhooks: registrations and the delivery outbox, in SQLite.

The outbox lives in the coordinator's database file (its own tables, its own
connection), so deliveries that were due when the coordinator stopped are made after
it starts again. Every method is a short SQLite statement run off the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["PENDING", "DELIVERED", "DEAD", "DeliveryRow", "SqliteWebhookStore", "WebhookRow"]

T = TypeVar("T")

_CACHED_OWNERS = 1024
"""Principals whose registrations are kept in memory (least recently used leave)."""

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
    created_ns INTEGER NOT NULL
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
    next_at_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_at_ns)
    WHERE state = 1;
CREATE INDEX IF NOT EXISTS webhook_deliveries_owner
    ON webhook_deliveries (owner, created_ns DESC);
"""

_DELIVERY_COLUMNS = (
    "delivery_id, webhook_id, owner, task_id, sequence, event_type, url, secret, body, "
    "state, attempts, last_error, created_ns, next_at_ns"
)


@dataclass(frozen=True)
class WebhookRow:
    """A principal's registered webhook."""

    webhook_id: str
    owner: str
    url: str
    secret: str
    created_ns: int


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


class SqliteWebhookStore:
    """Webhook registrations and deliveries in the coordinator's SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self._path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # Registrations by owner, read on every task's end: kept in memory (only this
        # store writes them) so most tasks cost no trip to the database thread.
        self._registrations: OrderedDict[str, tuple[WebhookRow, ...]] = OrderedDict()
        self._generation = 0  # bumped by every change: a read that raced one is not kept

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    def _changed(self, owner: str) -> None:
        self._generation += 1
        self._registrations.pop(owner, None)

    async def add_webhook(self, row: WebhookRow) -> None:
        """Store a registration."""
        self._changed(row.owner)
        try:
            await self._run(
                lambda c: c.execute(
                    "INSERT INTO webhooks (webhook_id, owner, url, secret, created_ns) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (row.webhook_id, row.owner, row.url, row.secret, row.created_ns),
                )
            )
        finally:
            # Again once written: a read that ran meanwhile may have seen either.
            self._changed(row.owner)

    async def webhooks_of(self, owner: str) -> list[WebhookRow]:
        """A principal's registrations, oldest first."""
        cached = self._registrations.get(owner)
        if cached is not None:
            self._registrations.move_to_end(owner)
            return list(cached)
        generation = self._generation

        def run(c: sqlite3.Connection) -> list[WebhookRow]:
            rows = c.execute(
                "SELECT webhook_id, owner, url, secret, created_ns FROM webhooks "
                "WHERE owner = ? ORDER BY created_ns, webhook_id",
                (owner,),
            ).fetchall()
            return [WebhookRow(*r) for r in rows]

        rows = await self._run(run)
        if generation == self._generation:
            self._registrations[owner] = tuple(rows)
            while len(self._registrations) > _CACHED_OWNERS:
                self._registrations.popitem(last=False)
        return rows

    async def delete_webhook(self, owner: str, webhook_id: str) -> bool:
        """Remove a registration; False when the principal has none with that id."""
        self._changed(owner)

        def run(c: sqlite3.Connection) -> bool:
            cursor = c.execute(
                "DELETE FROM webhooks WHERE owner = ? AND webhook_id = ?", (owner, webhook_id)
            )
            return cursor.rowcount > 0

        try:
            return await self._run(run)
        finally:
            self._changed(owner)

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
            )
            for r in rows
        ]
        await self._run(
            lambda c: c.executemany(
                # Only constant column names are formatted in; values are parameters.
                f"INSERT OR IGNORE INTO webhook_deliveries ({_DELIVERY_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params,
            )
        )

    async def due(self, now_ns: int, limit: int) -> list[DeliveryRow]:
        """Pending deliveries whose next attempt is due, the most overdue first."""

        def run(c: sqlite3.Connection) -> list[DeliveryRow]:
            rows = c.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries "  # noqa: S608
                "WHERE state = 1 AND next_at_ns <= ? ORDER BY next_at_ns LIMIT ?",
                (now_ns, limit),
            ).fetchall()
            return [DeliveryRow(*r) for r in rows]

        return await self._run(run)

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
        self, *, owner: str, state: int, task_id: str, limit: int
    ) -> list[DeliveryRow]:
        """Deliveries newest first; "" / 0 filters mean all (owner "" = every owner)."""
        where, params = [], []
        for column, value in (("owner", owner), ("task_id", task_id), ("state", state)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)} " if where else ""

        def run(c: sqlite3.Connection) -> list[DeliveryRow]:
            rows = c.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {clause}"  # noqa: S608
                "ORDER BY created_ns DESC, delivery_id LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [DeliveryRow(*r) for r in rows]

        return await self._run(run)
