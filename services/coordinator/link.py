"""One long-lived ``Link`` stream per agent instance, carrying many attempts.

Opening an ``Execute`` call per attempt costs both processes a call's setup, its
metadata, status and interceptors every time (docs/performance.md). :class:`AgentLink`
is one ``AgentService.Link`` stream to one agent instance, opened by the first
attempt sent there, reused by every later one and closed when the agent leaves the
pool (dispatch.py). :class:`LinkAttempt` is one attempt on it, with the interface of
:class:`~.dispatch.ExecuteStream` (send / close_sending / receive / finish / cancel),
so the attempt code in service.py does not care which it has: :func:`open_stream`
picks.

What an ``Execute`` call did by itself is done here per attempt:

* the deadline: :meth:`LinkAttempt.receive` stops waiting at the task's deadline,
  tells the agent to stop the attempt and fails it with the error a
  ``DEADLINE_EXCEEDED`` call gets;
* the trace: a CLIENT span per attempt whose context travels in the frame (the agent
  opens the server span from it), and the correlation id in the frame;
* a refusal before the attempt started (an invalid assignment, an agent at its
  maximum) comes as a ``LinkRefusal`` with the status the call would have ended with,
  classified exactly the same (:func:`~.dispatch.classify_status`);
* the message size: frames that pile up are joined up to ``LINK_BATCH_BYTES`` per
  message, and an assignment bigger than that goes on its own ``Execute`` call, so
  one too big for any message fails its own attempt, not the link;
* a link that breaks fails every attempt open on it as a broken call fails its one
  attempt (:func:`~.dispatch.classify_rpc_error`); one that the agent ends without an
  error ends them as a call that closed without a result.

The reader of the stream hands each message to its attempt's own queue, so it never
waits for one slow attempt. What those queues hold is bounded per link: each message
counts its size against the link's budget (setting ``link_buffer_bytes``) until its
attempt takes it; once the budget is used up the reader stops reading the stream until
attempts have taken half of it, so grpc's HTTP/2 flow control holds the agent back
instead of the coordinator's memory growing (nothing is dropped). The message that
fills the budget is still handed over, so a single message bigger than the budget goes
through and its attempt drains it. What never waits behind the budget: the deadline
(a timer of the attempt), the link's end and the Execute fallback (put by the reader
after its loop, and a paused reader wakes when the link is closed), and an attempt
that ends gives back what it had not taken.

An agent that answers ``UNIMPLEMENTED`` before any message
(it serves only ``Execute``) is remembered as such; the attempts that were on the way
are sent again as ``Execute`` calls, which is safe because the agent refused them
before starting any. After a broken connection before the first answer they are sent
again too: there the agent may have started one, which then runs twice under the same
attempt number (the at-least-once of any retry after a lost connection).
``PERMISSION_DENIED`` before any message is taken the same way (an authorization
policy that names only ``Execute``, or a servicer that inherits the generated stub's
``Link``, which the authz interceptor refuses): if ``Execute`` is refused too, the
attempt fails exactly as it does without links. A link that fails in any other way
before its first answer sends its attempts by ``Execute`` too, without remembering
anything: each then fails or succeeds as its own call would. Until that first answer
nothing more is written on the link (a write under way when the status arrives turns
it into ``INTERNAL`` in grpc.aio, hiding the refusal).

``grpc_client_*`` metrics count the ``Link`` call (one per agent), not attempts.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence

import grpc
from opentelemetry.trace import Status, StatusCode

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.services.base.lifecycle import Drain
from hivewire.services.coordinator import dispatch, metrics
from hivewire.services.coordinator.settings import LINK_BUFFER_BYTES
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime import tracing
from hivewire.services.runtime.config import LINK_BATCH_BYTES
from hivewire.services.runtime.errors import DeadlineExceeded, error_class_for
from hivewire.services.runtime.interceptors import observe_client_call

logger = logging.getLogger(__name__)

__all__ = ["LINK_METHOD", "AgentLink", "AttemptStream", "LinkAttempt", "open_stream"]

LINK_METHOD = f"/{agent_pb2.DESCRIPTOR.services_by_name['AgentService'].full_name}/Link"

Key = tuple[str, int]


class _Fallback:
    """Queued to attempts of a link the agent does not serve: go by Execute instead."""


class _Deadline:
    """Queued to an attempt when the task's deadline passes."""


_FALLBACK = _Fallback()
_DEADLINE = _Deadline()
_NO_LINK = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)
"""How an agent without ``Link`` answers: not served at all, or (a servicer that
inherits the generated stub, or a policy that lists only ``Execute``) refused."""
_Item = agent_pb2.ExecuteResponse | dispatch.AttemptError | _Fallback | _Deadline | None

_LINKS: weakref.WeakSet[AgentLink] = weakref.WeakSet()


def _held_bytes() -> float:
    """What every link holds (read by the metrics thread while the loop changes the set)."""
    for _ in range(3):
        try:
            return float(sum(link.held for link in list(_LINKS)))
        except RuntimeError:  # the set changed size while it was copied
            continue
    return 0.0


metrics.LINK_HELD_BYTES.set_function(_held_bytes)


class AgentLink:
    """One ``Link`` stream to one agent instance (opened at once, used by many attempts).

    Args:
        entry: The agent (its ``link_unsupported`` is set when it refuses ``Link``).
        stub: A stub on the agent's channel without client interceptors.
        buffer_bytes: Bytes of messages held for attempts before the reader stops
            reading the stream (see the module doc).

    Attributes:
        held: Bytes of messages handed to attempts that they have not taken yet.
    """

    def __init__(
        self,
        entry: dispatch.AgentEntry,
        stub: agent_pb2_grpc.AgentServiceAsyncStub,
        *,
        buffer_bytes: int = LINK_BUFFER_BYTES,
    ) -> None:
        self._entry = entry
        self._agent_id = entry.agent_id
        self.endpoint = entry.instance.endpoint
        self._attempts: dict[Key, LinkAttempt] = {}
        self._retirement = Drain(idle=lambda: not self._attempts, end=self.close)
        self._frames: list[agent_pb2.LinkFrame] = []
        self._wake = asyncio.Event()
        self._answered = False
        self._confirmed = asyncio.Event()
        self.closed = False
        self.held = 0
        self._budget = buffer_bytes
        # Set while the reader may read; cleared only while it waits for attempts.
        self._room = asyncio.Event()
        self._room.set()
        _LINKS.add(self)
        self._call = stub.Link()
        observe_client_call(self._call, "bidi_stream", LINK_METHOD)
        self._writer = asyncio.create_task(self._write(), name=f"link-writer-{self._agent_id}")
        self._reader = asyncio.create_task(self._read(), name=f"link-reader-{self._agent_id}")

    def attach(self, key: Key, attempt: LinkAttempt) -> None:
        """Route the messages of attempt ``key`` to ``attempt``."""
        self._attempts[key] = attempt

    def detach(self, key: Key) -> None:
        """Stop routing messages of attempt ``key`` (late ones are dropped)."""
        self._attempts.pop(key, None)
        self._retirement.settle()

    def retire(self) -> None:
        """Take no new attempts; close once the open ones have ended."""
        self._retirement.start()

    def post(self, frame: agent_pb2.LinkFrame) -> bool:
        """Queue a frame for the agent; False when the link is over."""
        if self.closed:
            return False
        self._frames.append(frame)
        self._wake.set()
        return True

    def close(self) -> None:
        """End the link; attempts still open on it fail as on a cancelled call."""
        if self.closed:
            return
        self.closed = True
        self._room.set()
        self._writer.cancel()
        self._call.cancel()

    def release(self, size: int) -> None:
        """An attempt took (or dropped) ``size`` bytes of messages: the reader may go on."""
        self.held -= size
        if self.held <= self._budget // 2 and not self._room.is_set():
            self._room.set()

    async def _make_room(self) -> None:
        """Stop reading until attempts have taken half the budget (or the link ends)."""
        metrics.LINK_PAUSES.inc()
        logger.debug("link to agent %s holds %d bytes: reading paused", self._agent_id, self.held)
        self._room.clear()
        await self._room.wait()

    async def _write(self) -> None:
        call = self._call
        while True:
            await self._wake.wait()
            self._wake.clear()
            frames = self._batch()
            try:
                # What piled up while the last write was under way goes in one message.
                await call.write(agent_pb2.LinkRequest(frames=frames))
                if not self._confirmed.is_set():
                    # Nothing more until the agent answered: a write under way when a
                    # refusal (UNIMPLEMENTED, PERMISSION_DENIED) arrives turns the call's
                    # status into INTERNAL, and the refusal is what says "use Execute".
                    await self._confirmed.wait()
            except dispatch.WRITE_ERRORS as exc:
                # The reader reports why the link ended.
                logger.debug("write to agent %s failed: %r", self._agent_id, exc)
                return

    def _batch(self) -> list[agent_pb2.LinkFrame]:
        """The queued frames up to :data:`LINK_BATCH_BYTES` (at least one); the rest wait."""
        frames = self._frames
        size = count = 0
        for frame in frames:
            size += frame.ByteSize()
            if count and size > LINK_BATCH_BYTES:
                break
            count += 1
        batch, self._frames = frames[:count], frames[count:]
        if self._frames:
            self._wake.set()
        return batch

    async def _read(self) -> None:
        call = self._call
        ending: _Item = None
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                assert isinstance(message, agent_pb2.LinkResponse)
                if not self._answered:
                    self._answered = True
                    self._confirmed.set()
                attempts = self._attempts
                for response in message.responses:
                    attempt = attempts.get((response.task_id, response.attempt))
                    if attempt is not None:
                        size = response.ByteSize()
                        self.held += size
                        attempt.deliver(response, size)
                for refusal in message.refusals:
                    attempt = attempts.get((refusal.task_id, refusal.attempt))
                    if attempt is not None:
                        attempt.deliver(_refusal_error(refusal, self._agent_id))
                if self.held >= self._budget and not self.closed:
                    await self._make_room()
        except grpc.aio.AioRpcError as err:
            if not self._answered and not self.closed:
                # The agent never answered on this link, so none of its attempts ran
                # (its end of a link that breaks stops them): they go by Execute.
                if err.code() in _NO_LINK:
                    logger.info(
                        "agent %s refuses Link (%s); it gets an Execute call per attempt",
                        self._agent_id,
                        err.code().name,
                    )
                    self._entry.link_unsupported = True
                else:
                    logger.info(
                        "link to agent %s failed before its first answer (%s): %d attempts "
                        "go by Execute",
                        self._agent_id,
                        err.code().name,
                        len(self._attempts),
                    )
                ending = _FALLBACK
            else:
                if not self.closed:
                    logger.info("link to agent %s broke: %s", self._agent_id, err.code().name)
                ending = dispatch.classify_rpc_error(err, self._agent_id)
        finally:
            self.closed = True
            self._writer.cancel()
            if self._entry.link is self:
                self._entry.link = None
            attempts, self._attempts = self._attempts, {}
            for attempt in attempts.values():
                attempt.deliver(ending)


def _refusal_error(refusal: agent_pb2.LinkRefusal, agent_id: str) -> dispatch.AttemptError:
    error = refusal.error
    try:
        code = grpc.StatusCode[error.code]
    except KeyError:
        code = grpc.StatusCode.UNKNOWN
    domain = error_class_for(code)(error.message, reason=error.reason, metadata=error.metadata)
    return dispatch.classify_status(code, domain, agent_id)


class LinkAttempt:
    """One attempt on an :class:`AgentLink`, used like an :class:`~.dispatch.ExecuteStream`.

    Args:
        link: The agent's link.
        lease: The agent slot the attempt runs on (for the Execute fallback).
        timeout: Seconds until the task's deadline.
        metadata: What an Execute call would carry (task id, attempt, correlation id).
    """

    def __init__(
        self,
        link: AgentLink,
        lease: dispatch.AgentLease,
        *,
        timeout: float,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        values = dict(metadata)
        self._link = link
        self._lease = lease
        self._metadata = metadata
        self._key: Key = (values.get(md.TASK_ID, ""), int(values.get(md.ATTEMPT, "0") or 0))
        self._correlation_id = values.get(md.CORRELATION_ID, "")
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        # Each item with the bytes it holds of the link's budget (0: not a message).
        self._queue: asyncio.Queue[tuple[_Item, int]] = asyncio.Queue()
        self._held = 0
        # One timer per attempt (cheaper than a timeout around every receive).
        self._timer = loop.call_at(self._deadline, self._queue.put_nowait, (_DEADLINE, 0))
        self._span, headers = tracing.client_span(dispatch.EXECUTE_METHOD)
        self._span.set_attribute("hivewire.link", True)
        self._traceparent = headers.get(md.TRACEPARENT, "")
        self._tracestate = headers.get(md.TRACESTATE, "")
        # Kept until the link answers: replayed on an Execute call if it never does.
        self._sent: list[agent_pb2.ExecuteRequest] | None = []
        self._fallback: dispatch.ExecuteStream | None = None
        self._over = False
        self._first = True
        link.attach(self._key, self)

    def deliver(self, item: _Item, size: int = 0) -> None:
        """Called by the link's reader: a message (``size`` bytes held), an error, or the end."""
        self._held += size
        self._queue.put_nowait((item, size))

    async def send(self, request: agent_pb2.ExecuteRequest) -> bool:
        """Send one message; returns False when the attempt is already over."""
        if self._fallback is not None:
            return await self._fallback.send(request)
        if self._over:
            return False
        if self._first and request.ByteSize() > LINK_BATCH_BYTES:
            # A big assignment goes by its own Execute call: one too big for a message
            # then fails its own attempt only, not the link of every attempt.
            self._sent = None
            return await self._to_execute(grpc.StatusCode.OK).send(request)
        if self._sent is not None:
            self._sent.append(request)
        frame = agent_pb2.LinkFrame(task_id=self._key[0], attempt=self._key[1], request=request)
        if self._first:
            self._first = False
            frame.traceparent = self._traceparent
            frame.tracestate = self._tracestate
            frame.correlation_id = self._correlation_id
        return self._link.post(frame)

    async def close_sending(self) -> None:
        """Nothing more will be sent (the agent forgets the attempt after its last message)."""
        if self._fallback is not None:
            await self._fallback.close_sending()

    async def receive(self) -> agent_pb2.ExecuteResponse | None:
        """The attempt's next message; None when the agent ended the link without a result.

        Raises:
            AttemptError: The link broke, the agent refused the attempt, or the
                task's deadline passed.
        """
        if self._fallback is not None:
            return await self._fallback.receive()
        item, size = await self._queue.get()
        if size and not self._over:
            self._held -= size
            self._link.release(size)
        if isinstance(item, agent_pb2.ExecuteResponse):
            self._sent = None
            if item.WhichOneof("kind") in ("result", "error"):
                self._end(grpc.StatusCode.OK)
            return item
        if isinstance(item, _Deadline):
            self._stop(grpc.StatusCode.DEADLINE_EXCEEDED)
            err = DeadlineExceeded("Deadline Exceeded")
            raise dispatch.classify_status(err.code, err, self._lease.agent_id)
        if isinstance(item, _Fallback):
            return await self._go_execute()
        self._end(grpc.StatusCode.UNAVAILABLE)
        if item is None:
            return None
        raise item

    async def _go_execute(self) -> agent_pb2.ExecuteResponse | None:
        stream = self._to_execute(grpc.StatusCode.UNIMPLEMENTED)
        for request in self._sent or ():
            await stream.send(request)
        self._sent = None
        return await stream.receive()

    def _to_execute(self, code: grpc.StatusCode) -> dispatch.ExecuteStream:
        """Leave the link (its span ends with ``code``): the attempt goes on an Execute call."""
        self._end(code)
        remaining = self._deadline - asyncio.get_running_loop().time()
        stream = self._fallback = dispatch.ExecuteStream(
            self._lease, timeout=remaining, metadata=self._metadata
        )
        return stream

    async def finish(self, within: float) -> None:
        """Wait for an Execute fallback's status; a link attempt is over at its last message."""
        if self._fallback is not None:
            await self._fallback.finish(within)

    def cancel(self) -> None:
        """Stop following the attempt; the agent stops it if it still runs."""
        if self._fallback is not None:
            self._fallback.cancel()
            return
        self._stop(grpc.StatusCode.CANCELLED)

    def _stop(self, code: grpc.StatusCode) -> None:
        if self._over:
            return
        self._link.post(agent_pb2.LinkFrame(task_id=self._key[0], attempt=self._key[1], close=True))
        self._end(code)

    def _end(self, code: grpc.StatusCode) -> None:
        if self._over:
            return
        self._over = True
        self._timer.cancel()
        self._link.detach(self._key)
        if self._held:
            # What it had not taken yet is given back: nobody will take it.
            self._link.release(self._held)
            self._held = 0
        span = self._span
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()


AttemptStream = dispatch.ExecuteStream | LinkAttempt
"""What an attempt talks to its agent through."""


def open_stream(
    lease: dispatch.AgentLease,
    *,
    timeout: float,
    metadata: Sequence[tuple[str, str]],
    link: bool,
    buffer_bytes: int = LINK_BUFFER_BYTES,
) -> AttemptStream:
    """Start an attempt's conversation with its agent: on the agent's Link, or an Execute.

    Args:
        lease: The agent slot.
        timeout: Seconds until the task's deadline.
        metadata: Task id, attempt, correlation id (and the token budget for Execute).
        link: Use the agent's ``Link`` (setting ``agent_link``) unless it has none.
        buffer_bytes: The budget of a link opened here (setting ``link_buffer_bytes``).
    """
    entry = lease.entry
    if not link or entry.link_unsupported:
        return dispatch.ExecuteStream(lease, timeout=timeout, metadata=metadata)
    current = entry.link
    if isinstance(current, AgentLink) and current.endpoint != entry.instance.endpoint:
        # The agent registered again at another address: new attempts go there.
        current.retire()
        current = None
    if not isinstance(current, AgentLink) or current.closed:
        current = AgentLink(entry, lease.stub, buffer_bytes=buffer_bytes)
        entry.link = current
    return LinkAttempt(current, lease, timeout=timeout, metadata=metadata)
