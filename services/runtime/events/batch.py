"""JetStream atomic batch publish (nats-server 2.12+, ADR-50), which nats-py 2.x lacks.

A batch is a run of ordinary publishes carrying three headers: ``Nats-Batch-Id`` (the
same for every message of the batch), ``Nats-Batch-Sequence`` (1, 2, ... with no gap)
and, on the last one, ``Nats-Batch-Commit: 1``. The server stages the messages and
stores all of them or none when the commit arrives; only the commit is sent as a
request, and its reply is one PubAck for the whole batch (``batch`` and ``count`` set)
or an API error. The messages before the commit carry no reply subject, so the server
answers none of them: one ack per batch instead of one per message.

What the server enforces (and :func:`publish_atomic` leaves to its caller): the stream
has ``allow_atomic``; at most :data:`MAX_ATOMIC_BATCH` messages a batch (the server's
``max_batch_size``, 1,000 by default); at most 50 batches in flight per stream; a batch
with no message for 10 s is abandoned. Every ``Nats-Msg-Id`` is checked against the
stream's duplicate window at the commit: a batch holding one already stored is rejected
whole (error 10201), so a batch sent again after a lost ack stores nothing twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck

from .headers import HEADER_BATCH_COMMIT, HEADER_BATCH_ID, HEADER_BATCH_SEQUENCE

__all__ = [
    "ERR_BATCH_DISABLED",
    "ERR_BATCH_UNSUPPORTED_HEADER",
    "MAX_ATOMIC_BATCH",
    "BatchMessage",
    "BatchRejectedError",
    "publish_atomic",
]

MAX_ATOMIC_BATCH = 1000
"""Messages a server takes in one atomic batch unless its ``max_batch_size`` says less."""

ERR_BATCH_DISABLED = 10174
"""The stream does not allow atomic batches (``allow_atomic`` off)."""
ERR_BATCH_UNSUPPORTED_HEADER = 10177
"""A header the server does not take in a batch: ``Nats-Msg-Id`` on nats-server 2.12.0."""


@dataclass(frozen=True, slots=True)
class BatchMessage:
    """One message of a batch, as it would be published on its own."""

    subject: str
    payload: bytes
    headers: Mapping[str, str]


class BatchRejectedError(Exception):
    """The server answered the commit with an error: nothing of the batch was stored.

    Attributes:
        err_code: JetStream's error code (10174: batches not allowed on the stream,
            10201: a message id already stored, 10176: incomplete...), 0 if the reply
            was not a batch's PubAck at all (a server that does not know batches).
    """

    def __init__(self, description: str, err_code: int = 0) -> None:
        super().__init__(description)
        self.err_code = err_code


async def publish_atomic(
    nc: NatsClient, messages: Sequence[BatchMessage], *, ack_timeout: float
) -> PubAck:
    """Send ``messages`` as one atomic batch and wait for the commit's PubAck.

    Args:
        nc: A connected client.
        messages: 1 to :data:`MAX_ATOMIC_BATCH` messages, stored in this order.
        ack_timeout: Seconds to wait for the commit's reply.

    Returns:
        The batch's PubAck (``seq`` is the last message's stream sequence).

    Raises:
        BatchRejectedError: The server refused the batch; none of it is stored.
        nats.errors.Error: The connection failed or no reply came in time; the batch
            may or may not be stored (send it again: its message ids de-duplicate it).
    """
    if not 0 < len(messages) <= MAX_ATOMIC_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_ATOMIC_BATCH} messages")
    batch_id = uuid.uuid4().hex
    last = len(messages)
    for sequence, message in enumerate(messages[:-1], start=1):
        headers = dict(message.headers)
        headers[HEADER_BATCH_ID] = batch_id
        headers[HEADER_BATCH_SEQUENCE] = str(sequence)
        await nc.publish(message.subject, message.payload, headers=headers)
    commit = messages[-1]
    headers = dict(commit.headers)
    headers[HEADER_BATCH_ID] = batch_id
    headers[HEADER_BATCH_SEQUENCE] = str(last)
    headers[HEADER_BATCH_COMMIT] = "1"
    reply = await nc.request(commit.subject, commit.payload, timeout=ack_timeout, headers=headers)
    try:
        response = json.loads(reply.data)
    except ValueError as exc:
        raise BatchRejectedError(f"not a PubAck: {reply.data[:80]!r}") from exc
    error = response.get("error")
    if error:
        raise BatchRejectedError(
            str(error.get("description", error)), int(error.get("err_code", 0))
        )
    ack = PubAck.from_response(response)
    if ack.batch_id != batch_id or ack.batch_size != last:
        # A server that ignores the batch headers stored the commit as a plain message.
        raise BatchRejectedError(f"not a batch's PubAck: {response}")
    return ack
