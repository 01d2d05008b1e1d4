"""Webhook registrations: what the store answers follows every change at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hivewire.services.coordinator.webhook_store import SqliteWebhookStore, WebhookRow

OWNER = "spiffe://hivewire.local/client/alice"


def row(webhook_id: str, owner: str = OWNER, created_ns: int = 1) -> WebhookRow:
    return WebhookRow(webhook_id, owner, f"https://example.com/{webhook_id}", "s", created_ns)


async def test_registrations_follow_adds_and_deletes(tmp_path: Path) -> None:
    async with SqliteWebhookStore(tmp_path / "c.db") as store:
        assert await store.webhooks_of(OWNER) == []
        await store.add_webhook(row("a", created_ns=1))
        assert [w.webhook_id for w in await store.webhooks_of(OWNER)] == ["a"]
        await store.add_webhook(row("b", created_ns=2))
        await store.add_webhook(row("x", owner="spiffe://hivewire.local/client/bob"))
        assert [w.webhook_id for w in await store.webhooks_of(OWNER)] == ["a", "b"]
        assert await store.delete_webhook("a")
        assert [w.webhook_id for w in await store.webhooks_of(OWNER)] == ["b"]
        assert not await store.delete_webhook("a")
        # A project's registrations are their own list.
        await store.add_webhook(WebhookRow("p", OWNER, "https://example.com/p", "s", 3, "proj-1"))
        assert [w.webhook_id for w in await store.webhooks_of("", project_id="proj-1")] == ["p"]
        assert [w.webhook_id for w in await store.webhooks_of(OWNER)] == ["b"]
        assert await store.delete_webhook("p")
        assert await store.webhooks_of("", project_id="proj-1") == []
    # A new store on the same file answers the same (nothing lived only in memory).
    async with SqliteWebhookStore(tmp_path / "c.db") as store:
        assert [w.webhook_id for w in await store.webhooks_of(OWNER)] == ["b"]


async def test_a_read_racing_an_add_is_not_kept_stale(tmp_path: Path) -> None:
    async with SqliteWebhookStore(tmp_path / "c.db") as store:
        for i in range(20):
            read = asyncio.ensure_future(store.webhooks_of(OWNER))
            await asyncio.sleep(0)  # the read is on its way to the database first
            await store.add_webhook(row(f"w{i}", created_ns=i))
            await read
            # Whatever the racing read saw, the next read sees the add.
            assert len(await store.webhooks_of(OWNER)) == i + 1
