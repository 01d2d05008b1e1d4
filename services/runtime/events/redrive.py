"""Redrive: give a durable subscriber its dead letters back.

A subscriber that exhausts an event's deliveries moves it to the dead-letter stream
(``HIVEWIRE_DLQ``) with headers naming the durable that gave up and the original
subject. Once the cause is fixed, :func:`redrive` republishes each of that durable's
dead letters, payload and trace context unchanged, to its original subject, and then
deletes it from the dead-letter stream.

Republishing goes to the subject, so every durable whose filter matches sees the event
again, not only the chosen one: subscribers are at-least-once and idempotent (an event
they already handled has the same ``Event.id``), so the others skip or repeat harmless
work. The new message's ``Nats-Msg-Id`` is ``redrive-<dlq stream>-<dlq sequence>``: a
redrive interrupted and run again within the stream's duplicate window does not
publish an event twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from ._nats import TRANSIENT_ERRORS, close_quietly, connect
from .headers import (
    HEADER_CONSUMER,
    HEADER_CORRELATION_ID,
    HEADER_MSG_ID,
    HEADER_ORIGINAL_SUBJECT,
    HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
)
from .settings import StreamSettings
from .subscriber import replay

logger = logging.getLogger(__name__)

__all__ = ["redrive"]

_CARRIED = (HEADER_CORRELATION_ID, HEADER_TRACEPARENT, HEADER_TRACESTATE)


async def redrive(
    nats_url: str,
    durable: str,
    *,
    pattern: str = ">",
    stream: StreamSettings | None = None,
    nats_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Republish one durable's dead letters to their original subjects.

    Args:
        nats_url: NATS server URL(s).
        durable: The subscriber whose dead letters go back (``HEADER_CONSUMER``).
        pattern: Only dead letters of these event types (as for ``subscribe``).
        stream: Stream names.
        nats_options: More ``nats.connect`` keyword arguments.

    Returns:
        The ids of the events republished, in dead-letter order.

    Raises:
        Unavailable: NATS cannot be reached.
    """
    names = stream or StreamSettings()
    chosen = [
        letter
        async for letter in replay(
            nats_url, pattern, stream=names, dead_letters=True, nats_options=nats_options
        )
        if letter.headers.get(HEADER_CONSUMER) == durable
        and letter.headers.get(HEADER_ORIGINAL_SUBJECT)
    ]
    if not chosen:
        return []
    client = await connect(
        nats_url, name="hivewire-events-redrive", fail_fast=True, options=nats_options
    )
    redriven: list[str] = []
    try:
        js = client.jetstream(timeout=5.0)
        for letter in chosen:
            headers = {
                HEADER_MSG_ID: f"redrive-{names.dlq_name}-{letter.stream_sequence}",
                **{key: letter.headers[key] for key in _CARRIED if key in letter.headers},
            }
            await js.publish(
                letter.headers[HEADER_ORIGINAL_SUBJECT],
                letter.event.SerializeToString(),
                headers=headers,
            )
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await js.delete_msg(names.dlq_name, letter.stream_sequence)
            redriven.append(letter.id)
            logger.info(
                "events: redrove %s %s to %s for %s",
                letter.type,
                letter.id,
                letter.headers[HEADER_ORIGINAL_SUBJECT],
                durable,
            )
    finally:
        await close_quietly(client)
    return redriven
