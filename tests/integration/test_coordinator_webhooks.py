"""Webhooks against a real local HTTP receiver: signed, retried, dead-lettered, durable.

A real coordinator over mTLS (the in-process test mesh) with a scripted agent; the
receiver is a real HTTP server on 127.0.0.1, allowed through the coordinator's
webhook allow-list (private addresses are refused by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2 as C
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import Mesh, collect, error_of, spec, start_mesh
from tests.support.webhook_receiver import WebhookReceiver

SECRET = "s3cret-s3cret-s3cret"
FAST = {"initial_backoff": 0.05, "max_backoff": 0.2, "timeout": 5.0}
DELIVERED = C.WEBHOOK_DELIVERY_STATE_DELIVERED
DEAD = C.WEBHOOK_DELIVERY_STATE_DEAD_LETTERED


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(
        pki.dir, tmp_path / "c.db", webhooks={**FAST, "allowed_hosts": ["127.0.0.1"]}
    ) as mesh:
        yield mesh


def hooked(url: str, **kwargs: Any) -> C.TaskSpec:
    task = spec(**kwargs)
    task.webhooks.add(url=url, secret=SECRET)
    return task


def verify(received: Any) -> None:
    """The signature is HMAC-SHA256(secret, timestamp + "." + body), and recent."""
    timestamp = received.headers["x-hivewire-timestamp"]
    expected = hmac.new(
        SECRET.encode(), timestamp.encode() + b"." + received.body, hashlib.sha256
    ).hexdigest()
    assert received.headers["x-hivewire-signature"] == f"sha256={expected}"
    assert abs(time.time() - int(timestamp)) < 300


async def deliveries(mesh: Mesh, task_id: str) -> list[C.WebhookDelivery]:
    response = await mesh.client().ListWebhookDeliveries(
        C.ListWebhookDeliveriesRequest(task_id=task_id)
    )
    return list(response.deliveries)


async def only_delivery(mesh: Mesh, task_id: str) -> C.WebhookDelivery:
    found = await deliveries(mesh, task_id)
    assert len(found) == 1, found
    return found[0]


async def test_a_failing_receiver_gets_the_event_after_retries(mesh: Mesh) -> None:
    await mesh.agent()
    async with WebhookReceiver(statuses=[503, 502]) as receiver:
        client = mesh.client()
        task = await client.SubmitTask(C.SubmitTaskRequest(spec=hooked(receiver.url, text="x")))
        task_id = task.task.task_id
        async with asyncio.timeout(30):
            attempts = await receiver.wait_for(3)

        async def delivered() -> C.WebhookDelivery:
            delivery = await only_delivery(mesh, task_id)
            assert delivery.state == DELIVERED
            return delivery

        delivery = await eventually(delivered, timeout=10)
    assert [a.path for a in attempts] == ["/hooks"] * 3
    assert len({a.headers["x-hivewire-delivery"] for a in attempts}) == 1
    for attempt in attempts:
        verify(attempt)
        assert attempt.headers["x-hivewire-event"] == "task.completed"
        assert attempt.headers["content-type"] == "application/json"
    body = attempts[-1].json()
    assert body["type"] == "task.completed"
    assert body["task"]["task_id"] == task_id and body["task"]["state"] == "succeeded"
    assert body["event"]["finished"]["output"]["text"] == "done:x"
    assert SECRET not in attempts[-1].body.decode()
    assert delivery.attempts == 3 and delivery.event_type == "task.completed"
    assert delivery.delivery_id == attempts[0].headers["x-hivewire-delivery"]


async def test_a_receiver_that_keeps_failing_is_dead_lettered(pki: Pki, tmp_path: Path) -> None:
    settings = {**FAST, "allowed_hosts": ["127.0.0.1"], "max_attempts": 3}
    async with (
        start_mesh(pki.dir, tmp_path / "c.db", webhooks=settings) as mesh,
        WebhookReceiver(default=500) as receiver,
    ):
        await mesh.agent()
        task = await mesh.client().SubmitTask(C.SubmitTaskRequest(spec=hooked(receiver.url)))

        async def dead() -> C.WebhookDelivery:
            delivery = await only_delivery(mesh, task.task.task_id)
            assert delivery.state == DEAD
            return delivery

        delivery = await eventually(dead, timeout=30)
        assert delivery.attempts == 3 and delivery.last_error == "HTTP 500"
        assert len(receiver.received) == 3
        listed = await mesh.client().ListWebhookDeliveries(
            C.ListWebhookDeliveriesRequest(state=DEAD)
        )
        assert [d.delivery_id for d in listed.deliveries] == [delivery.delivery_id]


async def test_a_4xx_answer_is_not_retried(mesh: Mesh) -> None:
    await mesh.agent()
    async with WebhookReceiver(default=410) as receiver:
        task = await mesh.client().SubmitTask(C.SubmitTaskRequest(spec=hooked(receiver.url)))

        async def dead() -> None:
            delivery = await only_delivery(mesh, task.task.task_id)
            assert delivery.state == DEAD and delivery.last_error == "HTTP 410"
            assert delivery.attempts == 1

        await eventually(dead, timeout=20)


async def test_registered_webhooks_get_input_requests_and_results(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    async with WebhookReceiver() as receiver:
        registered = await client.RegisterWebhook(
            C.RegisterWebhookRequest(webhook=C.Webhook(url=receiver.url, secret=SECRET))
        )
        webhook_id = registered.registration.webhook_id
        listed = await client.ListWebhooks(C.ListWebhooksRequest())
        assert [(r.webhook_id, r.url) for r in listed.registrations] == [(webhook_id, receiver.url)]
        assert SECRET not in str(listed)
        # Another principal does not see it, and its tasks do not go there.
        admin_hooks = await mesh.client("admin").ListWebhooks(C.ListWebhooksRequest())
        assert not admin_hooks.registrations

        task = await client.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"ask": "ok?"})))
        task_id = task.task.task_id
        async with asyncio.timeout(30):
            [asked] = await receiver.wait_for(1)
        verify(asked)
        assert asked.json()["type"] == "task.input_required"
        assert asked.json()["event"]["input_required"]["prompt"] == "ok?"
        request_id = asked.json()["event"]["input_required"]["request_id"]
        await client.ProvideInput(
            C.ProvideInputRequest(
                task_id=task_id,
                response=common_pb2.InputResponse(
                    request_id=request_id, value=common_pb2.Payload(text="yes")
                ),
            )
        )
        async with asyncio.timeout(30):
            received = await receiver.wait_for(2)
        assert received[1].json()["type"] == "task.completed"
        assert {d.webhook_id for d in await deliveries(mesh, task_id)} == {webhook_id}

        await client.DeleteWebhook(C.DeleteWebhookRequest(webhook_id=webhook_id))
        assert not (await client.ListWebhooks(C.ListWebhooksRequest())).registrations
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.DeleteWebhook(C.DeleteWebhookRequest(webhook_id=webhook_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_urls_are_validated(pki: Pki, tmp_path: Path) -> None:
    # No allow-list here: private and loopback hosts are refused.
    async with start_mesh(pki.dir, tmp_path / "c.db", webhooks=FAST) as mesh:
        client = mesh.client()
        cases = {
            "http://127.0.0.1:9/hooks": "loopback",
            "http://10.1.2.3/hooks": "private",
            "http://169.254.169.254/latest": "link-local",
            "http://localhost:9/": "resolves to loopback",
            "ftp://example.com/x": "scheme",
            "https://user:pw@example.com/x": "credentials",
            "not a url": "scheme",
        }
        for url, why in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.SubmitTask(C.SubmitTaskRequest(spec=hooked(url)))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
            error = error_of(caught.value)
            assert error.reason == "WEBHOOK_INVALID", why
        short = spec()
        short.webhooks.add(url="http://127.0.0.1:9/", secret="short")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.RegisterWebhook(
                C.RegisterWebhookRequest(webhook=C.Webhook(url="http://10.0.0.1/", secret="x"))
            )
        fields = {v.field for v in error_of(caught.value).violations}  # type: ignore[attr-defined]
        assert fields == {"webhook.url", "webhook.secret"}


async def test_a_pending_delivery_survives_a_coordinator_restart(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    settings = {"initial_backoff": 0.5, "max_backoff": 0.5, "allowed_hosts": ["127.0.0.1"]}
    async with WebhookReceiver(default=503) as receiver:
        async with start_mesh(pki.dir, db, webhooks=settings) as mesh:
            await mesh.agent()
            task = await mesh.client().SubmitTask(C.SubmitTaskRequest(spec=hooked(receiver.url)))
            task_id = task.task.task_id
            async with asyncio.timeout(30):
                await receiver.wait_for(1)
        # The coordinator is gone with the delivery still pending; the receiver recovers.
        failed = len(receiver.received)
        receiver.default = 200
        async with start_mesh(pki.dir, db, webhooks=settings) as mesh:

            async def delivered() -> C.WebhookDelivery:
                delivery = await only_delivery(mesh, task_id)
                assert delivery.state == DELIVERED
                return delivery

            delivery = await eventually(delivered, timeout=30)
        assert delivery.attempts == failed + 1
        assert len({r.headers["x-hivewire-delivery"] for r in receiver.received}) == 1
        verify(receiver.received[-1])


# -- webhooks per project ------------------------------------------------------------


async def new_project(mesh: Mesh) -> str:
    created = await mesh.client().CreateProject(C.CreateProjectRequest(name="launch", goal="ship"))
    return created.project.project_id


def in_project(project_id: str, **kwargs: Any) -> C.TaskSpec:
    task = spec(**kwargs)
    task.project_id = project_id
    return task


async def project_deliveries(mesh: Mesh, project_id: str) -> list[C.WebhookDelivery]:
    response = await mesh.client().ListWebhookDeliveries(
        C.ListWebhookDeliveriesRequest(project_id=project_id)
    )
    return list(response.deliveries)


async def test_a_project_webhook_gets_every_task_of_the_project(mesh: Mesh) -> None:
    await mesh.agent()
    client, admin, other = mesh.client(), mesh.client("admin"), mesh.client("mcp")
    project_id = await new_project(mesh)
    hook = C.Webhook(url="http://127.0.0.1:9/hooks", secret=SECRET)
    # Only the project's owner or an admin manages its webhooks.
    for call in (
        other.RegisterWebhook(C.RegisterWebhookRequest(webhook=hook, project_id=project_id)),
        other.ListWebhooks(C.ListWebhooksRequest(project_id=project_id)),
        other.ListWebhookDeliveries(C.ListWebhookDeliveriesRequest(project_id=project_id)),
        client.RegisterWebhook(C.RegisterWebhookRequest(webhook=hook, project_id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_of(caught.value).reason == "PROJECT_NOT_FOUND"

    # A task outside the project, finished before the webhook exists: never delivered.
    outside = await client.SubmitTask(C.SubmitTaskRequest(spec=spec(text="outside")))
    async with WebhookReceiver(statuses=[503, 503]) as receiver:
        registered = await client.RegisterWebhook(
            C.RegisterWebhookRequest(
                webhook=C.Webhook(url=receiver.url, secret=SECRET), project_id=project_id
            )
        )
        registration = registered.registration
        assert registration.project_id == project_id
        assert registration.owner.endswith("/client")
        listed = await client.ListWebhooks(C.ListWebhooksRequest(project_id=project_id))
        assert [r.webhook_id for r in listed.registrations] == [registration.webhook_id]
        assert SECRET not in str(listed)
        # Not one of the principal's webhooks: those are for every task it submits.
        assert not (await client.ListWebhooks(C.ListWebhooksRequest())).registrations
        by_admin = await admin.ListWebhooks(C.ListWebhooksRequest(project_id=project_id))
        assert [r.webhook_id for r in by_admin.registrations] == [registration.webhook_id]

        await collect(client.StreamTask(C.StreamTaskRequest(spec=spec(text="also outside"))))
        # The owner's task and an admin's task in the project both go to the webhook.
        mine = await client.SubmitTask(
            C.SubmitTaskRequest(spec=in_project(project_id, text="mine"))
        )
        theirs = await admin.SubmitTask(
            C.SubmitTaskRequest(spec=in_project(project_id, text="theirs"))
        )
        project_tasks = {mine.task.task_id, theirs.task.task_id}

        async def both_delivered() -> list[C.WebhookDelivery]:
            found = await project_deliveries(mesh, project_id)
            assert {d.task_id for d in found} == project_tasks
            assert all(d.state == DELIVERED for d in found), found
            return found

        delivered = await eventually(both_delivered, timeout=30)
        # The first two attempts failed (503) and were retried.
        assert sum(d.attempts for d in delivered) == 4
        assert {d.webhook_id for d in delivered} == {registration.webhook_id}
        assert {d.project_id for d in delivered} == {project_id}
        assert len(receiver.received) == 4
        bodies = [r.json() for r in receiver.received]
        assert {b["task"]["task_id"] for b in bodies} == project_tasks
        assert {b["task"]["project_id"] for b in bodies} == {project_id}
        assert {b["type"] for b in bodies} == {"task.completed"}
        for received in receiver.received:
            verify(received)
        assert not await deliveries(mesh, outside.task.task_id)

        # Another principal may not delete it; an admin may.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other.DeleteWebhook(C.DeleteWebhookRequest(webhook_id=registration.webhook_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        await admin.DeleteWebhook(C.DeleteWebhookRequest(webhook_id=registration.webhook_id))
        listed = await client.ListWebhooks(C.ListWebhooksRequest(project_id=project_id))
        assert not listed.registrations


async def test_a_project_webhook_that_keeps_failing_is_dead_lettered(
    pki: Pki, tmp_path: Path
) -> None:
    settings = {**FAST, "allowed_hosts": ["127.0.0.1"], "max_attempts": 2}
    async with (
        start_mesh(pki.dir, tmp_path / "c.db", webhooks=settings) as mesh,
        WebhookReceiver(default=500) as receiver,
    ):
        await mesh.agent()
        project_id = await new_project(mesh)
        await mesh.client().RegisterWebhook(
            C.RegisterWebhookRequest(
                webhook=C.Webhook(url=receiver.url, secret=SECRET), project_id=project_id
            )
        )
        task = await mesh.client().SubmitTask(C.SubmitTaskRequest(spec=in_project(project_id)))

        async def dead() -> C.WebhookDelivery:
            found = await project_deliveries(mesh, project_id)
            assert len(found) == 1 and found[0].state == DEAD, found
            return found[0]

        delivery = await eventually(dead, timeout=30)
        assert delivery.task_id == task.task.task_id
        assert delivery.attempts == 2 and delivery.last_error == "HTTP 500"
        assert len(receiver.received) == 2


async def test_a_project_webhook_survives_a_coordinator_restart(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    settings = {"initial_backoff": 0.5, "max_backoff": 0.5, "allowed_hosts": ["127.0.0.1"]}
    async with WebhookReceiver(default=503) as receiver:
        async with start_mesh(pki.dir, db, webhooks=settings) as mesh:
            await mesh.agent()
            project_id = await new_project(mesh)
            await mesh.client().RegisterWebhook(
                C.RegisterWebhookRequest(
                    webhook=C.Webhook(url=receiver.url, secret=SECRET), project_id=project_id
                )
            )
            first = await mesh.client().SubmitTask(
                C.SubmitTaskRequest(spec=in_project(project_id, text="before"))
            )
            async with asyncio.timeout(30):
                await receiver.wait_for(1)
        # Stopped with the delivery pending; the receiver recovers.
        receiver.default = 200
        async with start_mesh(pki.dir, db, webhooks=settings) as mesh:
            await mesh.agent()
            # The registration is still there: a task after the restart is delivered too.
            second = await mesh.client().SubmitTask(
                C.SubmitTaskRequest(spec=in_project(project_id, text="after"))
            )

            async def both_delivered() -> None:
                found = await project_deliveries(mesh, project_id)
                assert {d.task_id for d in found} == {first.task.task_id, second.task.task_id}
                assert all(d.state == DELIVERED for d in found), found

            await eventually(both_delivered, timeout=30)
        for received in receiver.received:
            verify(received)
