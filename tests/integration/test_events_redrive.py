"""Dead-lettered events you can act on: ``hivewire events --dlq`` and ``events redrive``.

A real nats-server; a durable subscriber whose handler fails until the test fixes it
dead-letters an event; the CLI (a real process) shows the dead letter with the durable
and its error, then redrives it to the original subject, where the fixed subscriber
handles it and the dead-letter stream is left empty.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.events import (
    EventPublisher,
    ReceivedEvent,
    replay,
    subscribe,
)
from tests.helpers import NatsServer, eventually

HIVEWIRE = str(Path(sys.executable).parent / "hivewire")


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE, "events", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_a_dead_letter_is_shown_and_redriven_to_its_durable(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    broken = True
    handled: list[str] = []
    others: list[str] = []

    async def handler(received: ReceivedEvent) -> None:
        if broken:
            raise RuntimeError("database is down")
        handled.append(received.id)

    async def audit(received: ReceivedEvent) -> None:
        others.append(received.id)

    async with EventPublisher(url, source="coordinator/redrive-test") as publisher:
        publisher.publish(
            "task.completed",
            subject="task-r",
            data=events_pb2.TaskEventData(task_id="task-r", capability="echo"),
            task_sequence=3,
            correlation_id="cid-r",
        )
        assert await publisher.flush(10)

    async with (
        subscribe(url, "task.*", handler, durable="billing", max_deliver=2, backoff=[0.05]) as sub,
        subscribe(url, "task.*", audit, durable="audit") as auditor,
    ):
        await eventually(lambda: sub.stats.dead_lettered == 1, timeout=30)
        await eventually(lambda: len(others) == 1, timeout=10)

        code, out, err = await run_cli("--dlq", "--nats-url", url)
        assert code == 0, err
        [line] = out.splitlines()
        assert "task.completed" in line and "task-r" in line
        assert "durable=billing" in line and "deliveries=2" in line
        assert "error='RuntimeError: database is down'" in line
        # The event stream itself is untouched.
        code, out, _ = await run_cli("--nats-url", url)
        assert "durable=" not in out and "task.completed" in out

        broken = False  # the cause is fixed
        code, out, err = await run_cli("redrive", "--durable", "nobody", "--nats-url", url)
        assert code == 0 and out == "" and "redrove 0" in err
        code, out, err = await run_cli("redrive", "--durable", "billing", "--nats-url", url)
        assert code == 0, err
        [event_id] = out.split()
        assert "redrove 1 dead letter(s) of billing" in err

        await eventually(lambda: handled == [event_id], timeout=20)
        # The redrive goes to the subject, so the audit durable got the event again: it
        # knows the id and skips it (at-least-once delivery, idempotent handling).
        await eventually(lambda: auditor.stats.duplicates == 1, timeout=20)
        assert others == [event_id]

    assert [r async for r in replay(url, dead_letters=True)] == []
    again = [r async for r in replay(url, "task.completed")]
    assert [r.id for r in again] == [event_id, event_id]
    assert again[1].headers["X-Correlation-Id"] == "cid-r"
    assert again[1].event.traceparent == again[0].event.traceparent
