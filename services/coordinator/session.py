"""The ``Session`` stream: many tasks started, cancelled, answered and watched over one call.

The session is an adapter over the coordinator's public operations (submit, cancel,
provide input, watch, follow), a layer above :mod:`.service` like the servicer that
runs it: it owns no task state, only which tasks this stream follows and how far each
has been sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.base.lifecycle import cancel_and_wait
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.model import Caller
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.runtime.errors import (
    FieldViolation,
    HivewireError,
    Internal,
    InvalidArgument,
)

logger = logging.getLogger(__name__)

__all__ = ["Session"]

_SENT_KEPT = 1024
"""Finished tasks of one session whose sent position is remembered (deduplicated starts)."""

TaskEvent = coordinator_pb2.TaskEvent


class Session:
    """One ``Session`` stream: start, cancel, answer and watch tasks over one call.

    The responses interleave ``accepted``/``rejected`` answers with the events of
    every task started or watched in the session. A bad request gets a ``rejected``
    answer and the session goes on. The stream ends once the client has half-closed
    and every followed task has finished. Disconnecting cancels no task.
    """

    def __init__(
        self, coordinator: Coordinator, caller: Caller, correlation_id: str | None
    ) -> None:
        self._coordinator = coordinator
        self._caller = caller
        self._correlation_id = correlation_id
        self._out: asyncio.Queue[coordinator_pb2.SessionResponse | None] = asyncio.Queue(
            maxsize=1024
        )
        self._pumps: dict[str, asyncio.Task[None]] = {}
        # Highest sequence sent per followed task (see _retire_sent for its bound).
        self._sent: OrderedDict[str, int] = OrderedDict()
        self._input_done = False
        self._closed = False

    async def run(
        self, requests: AsyncIterator[coordinator_pb2.SessionRequest]
    ) -> AsyncIterator[coordinator_pb2.SessionResponse]:
        reader = asyncio.create_task(self._read(requests), name="session-reader")
        try:
            while True:
                item = await self._out.get()
                if item is None:
                    break
                yield item
            # Surface an unexpected failure of the reader (not a client disconnect).
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if failure is not None:
                raise failure
        finally:
            self._closed = True
            await cancel_and_wait([reader, *self._pumps.values()], suppress=(Exception,))

    async def _read(self, requests: AsyncIterator[coordinator_pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(request)
        except HivewireError as err:
            await self._out.put(
                coordinator_pb2.SessionResponse(
                    rejected=coordinator_pb2.SessionRejected(error=convert.error_detail(err))
                )
            )
        finally:
            self._input_done = True
            await self._maybe_end()

    async def _maybe_end(self) -> None:
        # Once the stream is being torn down nobody reads the queue: do not wait on it.
        if self._closed:
            return
        if self._input_done and all(p.done() for p in self._pumps.values()):
            await self._out.put(None)

    async def _reject(self, err: HivewireError, *, client_ref: str = "", task_id: str = "") -> None:
        await self._out.put(
            coordinator_pb2.SessionResponse(
                rejected=coordinator_pb2.SessionRejected(
                    client_ref=client_ref, task_id=task_id, error=convert.error_detail(err)
                )
            )
        )

    async def _handle(self, request: coordinator_pb2.SessionRequest) -> None:
        kind = request.WhichOneof("kind")
        c = self._coordinator
        try:
            if kind == "start":
                start = request.start
                try:
                    record, deduplicated = await c.submit(
                        start.spec if start.HasField("spec") else None,
                        self._caller,
                        correlation_id=self._correlation_id,
                    )
                except HivewireError as err:
                    await self._reject(err, client_ref=start.client_ref)
                    return
                await self._out.put(
                    coordinator_pb2.SessionResponse(
                        accepted=coordinator_pb2.SessionAccepted(
                            client_ref=start.client_ref,
                            task_id=record.task_id,
                            deduplicated=deduplicated,
                        )
                    )
                )
                # A deduplicated start of a task this session already followed goes on
                # after what was sent: the client saw those events once already.
                after = self._sent.get(record.task_id, 0)
                self._follow(
                    record.task_id,
                    c.follow(record.task_id, after, outcome_only=start.outcome_only),
                )
            elif kind == "cancel":
                await c.cancel(request.cancel.task_id, self._caller, request.cancel.reason)
            elif kind == "input":
                await c.provide_input(
                    request.input.task_id,
                    request.input.response if request.input.HasField("response") else None,
                    self._caller,
                )
            elif kind == "watch":
                task_id = request.watch.task_id
                current = self._pumps.get(task_id)
                if current is not None and not current.done():
                    return
                events = await c.watch(
                    task_id,
                    self._caller,
                    after_sequence=request.watch.after_sequence,
                    outcome_only=request.watch.outcome_only,
                )
                self._follow(task_id, events)
            else:
                raise InvalidArgument(
                    violations=[FieldViolation("kind", "one of start, cancel, input, watch")]
                )
        except HivewireError as err:
            task_id = ""
            if kind in ("cancel", "input", "watch"):
                task_id = getattr(request, kind).task_id
            await self._reject(err, task_id=task_id)
        except Exception:
            logger.exception("session request %s failed", kind)
            await self._reject(Internal("internal error"))

    def _retire_sent(self, task_id: str) -> None:
        """Keep what was sent of a followed task only for the latest followed ones.

        A long session follows any number of tasks; only a deduplicated start of a
        recent one needs its position (older ones replay from their first event).
        """
        if task_id in self._sent:
            self._sent.move_to_end(task_id)
        while len(self._sent) > len(self._pumps) + _SENT_KEPT:
            oldest = next(iter(self._sent))
            if oldest in self._pumps:
                self._sent.move_to_end(oldest)
                continue
            del self._sent[oldest]

    def _follow(self, task_id: str, events: AsyncIterator[TaskEvent]) -> None:
        current = self._pumps.get(task_id)
        if current is not None and not current.done():
            # Already followed in this session (a deduplicated start, a second watch):
            # a second pump would send every event twice.
            return

        async def pump() -> None:
            try:
                async for event in events:
                    if event.WhichOneof("kind") != "snapshot":
                        self._sent[task_id] = max(self._sent.get(task_id, 0), event.sequence)
                    await self._out.put(coordinator_pb2.SessionResponse(event=event))
            except HivewireError as err:
                await self._reject(err, task_id=task_id)
            finally:
                if self._pumps.get(task_id) is asyncio.current_task():
                    del self._pumps[task_id]
                    self._retire_sent(task_id)
                await self._maybe_end()

        self._pumps[task_id] = asyncio.create_task(pump(), name=f"session-{task_id}")
