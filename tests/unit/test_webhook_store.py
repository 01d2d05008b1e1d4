"""The webhook store: principal and project registrations apart, and files from before projects.

A real SQLite file. A file written before project webhooks existed (no ``project_id``
columns) is opened as it is: its registrations and pending deliveries are kept and
become the principal's, and project registrations can be added to it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hivewire.services.coordinator.webhook_store import (
    PENDING,
    DeliveryRow,
    SqliteWebhookStore,
    WebhookRow,
)

# The schema as the first release wrote it.
_OLD_SCHEMA = """
CREATE TABLE webhooks (
    webhook_id TEXT PRIMARY KEY, owner TEXT NOT NULL, url TEXT NOT NULL,
    secret TEXT NOT NULL, created_ns INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, owner TEXT NOT NULL,
    task_id TEXT NOT NULL, sequence INTEGER NOT NULL, event_type TEXT NOT NULL,
    url TEXT NOT NULL, secret TEXT NOT NULL, body BLOB NOT NULL, state INTEGER NOT NULL,
    attempts INTEGER NOT NULL, last_error TEXT NOT NULL, created_ns INTEGER NOT NULL,
    next_at_ns INTEGER NOT NULL
);
INSERT INTO webhooks VALUES ('w-old', 'spiffe://t/client/a', 'https://a.example/', 'k', 1);
INSERT INTO webhook_deliveries VALUES ('d-old', 'w-old', 'spiffe://t/client/a', 't1', 3,
    'task.completed', 'https://a.example/', 'k', x'7b7d', 1, 0, '', 1, 1);
"""


def delivery(delivery_id: str, *, project_id: str = "", owner: str = "o") -> DeliveryRow:
    return DeliveryRow(
        delivery_id, "w", owner, "t2", 1, "task.failed", "https://b.example/", "k", b"{}",
        PENDING, 0, "", 2, 2, project_id,
    )  # fmt: skip


async def test_a_file_from_before_project_webhooks_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
    async with SqliteWebhookStore(path) as store:
        [old] = await store.webhooks_of("spiffe://t/client/a")
        assert (old.webhook_id, old.project_id) == ("w-old", "")
        [due] = await store.due(10, 10)
        assert (due.delivery_id, due.project_id) == ("d-old", "")
        await store.add_webhook(
            WebhookRow("w-p", "spiffe://t/client/a", "https://p/", "k", 2, "p1")
        )
        await store.add_deliveries([delivery("d-p", project_id="p1")])
    # Opening it again finds the columns there and changes nothing.
    async with SqliteWebhookStore(path) as store:
        assert [w.webhook_id for w in await store.webhooks_of("spiffe://t/client/a")] == ["w-old"]
        [project_hook] = await store.webhooks_of("", project_id="p1")
        assert project_hook.webhook_id == "w-p" and project_hook.project_id == "p1"
        found = await store.deliveries(owner="", state=0, task_id="", limit=10, project_id="p1")
        assert [d.delivery_id for d in found] == ["d-p"]


async def test_principal_and_project_registrations_stay_apart(tmp_path: Path) -> None:
    async with SqliteWebhookStore(tmp_path / "c.db") as store:
        await store.add_webhook(WebhookRow("mine", "alice", "https://a/", "k", 1))
        await store.add_webhook(WebhookRow("proj", "alice", "https://p/", "k", 2, "p1"))
        await store.add_webhook(WebhookRow("other", "bob", "https://q/", "k", 3, "p2"))
        assert [w.webhook_id for w in await store.webhooks_of("alice")] == ["mine"]
        assert [w.webhook_id for w in await store.webhooks_of("", project_id="p1")] == ["proj"]
        assert [w.webhook_id for w in await store.webhooks_of("", project_id="p2")] == ["other"]
        fetched = await store.webhook("proj")
        assert fetched is not None and fetched.project_id == "p1"
        assert await store.delete_webhook("proj")
        assert not await store.delete_webhook("proj")
        assert await store.webhook("proj") is None
        assert not await store.webhooks_of("", project_id="p1")
