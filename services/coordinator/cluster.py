"""Several coordinators on one JetStream store: leases, takeover, requests to the owner.

Every unfinished task is owned by exactly one coordinator, named in its stored row
(``TaskRow.coordinator``, ``Task.coordinator_id``). The coordinator that accepts a task
owns it; only the owner dispatches it, and every write of a task row is a
compare-and-set on the revision its owner last wrote (jetstream_store.py), so a
coordinator that lost a task cannot overwrite it.

**The lease.** Ownership of all of a coordinator's tasks is renewed at once: each
coordinator puts its key in ``<prefix>_COORDINATORS`` every ``lease_heartbeat``
seconds. A peer whose key has not changed for ``lease_ttl`` seconds - counted only
while this coordinator's own heartbeats succeed, so a NATS outage that stops every
heartbeat expires nobody - is dead, and so is one whose key was deleted (a graceful
stop). Its tasks are then taken over: each surviving coordinator claims them with a
compare-and-set of the row (one claim wins), a family (a plan or task with its steps
and sub-tasks) at a time, root first, so a family stays on one coordinator. A claimed
task is recovered like after a restart: a running attempt runs again as a new attempt,
plans resume.

One heartbeat key per coordinator rather than one lease key per task keeps the lease
cost O(coordinators), not O(tasks); the row's revision compare-and-set is the fence.
A coordinator cut off from NATS fences itself before its peers can expire it: it stops
dispatching once its last heartbeat is ``lease_ttl / 2`` old, and at ``0.8 *
lease_ttl`` it lets go of every task (stops their attempts, drops their pending
writes). When its heartbeats succeed again it claims back those of its tasks no peer
took, and runs them as new attempts.

**Requests to the owner.** Each coordinator answers NATS requests on
``hivewire.coordinator.<instance id>``: a ``CancelTask``, ``ProvideInput`` or sub-task
``SubmitTask`` that reached another coordinator is checked there (same
authorization), then forwarded to the owner, which holds the agent's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors
from google.rpc import status_pb2
from nats.js import errors as js_errors

from hivewire.services.base.lifecycle import cancel_and_wait
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.coordinator.model import now_ns
from hivewire.services.coordinator.store import EventRow, TaskRow
from hivewire.services.runtime.errors import HivewireError, Internal, Unavailable
from hivewire.services.runtime.status import from_rpc_status, to_rpc_status

logger = logging.getLogger(__name__)

__all__ = ["CONTROL_SUBJECT", "Cluster", "ClusterHost", "ClusterOptions"]

CONTROL_SUBJECT = "hivewire.coordinator"
"""Prefix of the subjects coordinators answer requests on (``<prefix>.<instance id>``)."""

_SWEEP_EVERY = 15
"""Peer checks between two looks for tasks nobody owns."""

_OP = "Hivewire-Op"
_CALLER = "Hivewire-Caller"
_CORRELATION = "Hivewire-Correlation-Id"
_ERROR = "Hivewire-Error"


class ClusterHost(Protocol):
    """What the cluster needs from the coordinator it serves."""

    async def take_over(self, rows: Sequence[TaskRow], previous: str) -> None:
        """Recover tasks just claimed from a dead coordinator."""
        ...

    def drop(self, task_id: str) -> None:
        """Let go of a task another coordinator took over (stop its attempt)."""
        ...

    def abandon(self) -> None:
        """Let go of every task: this coordinator's lease may have expired."""
        ...

    async def answer(self, op: str, caller: str, body: bytes, correlation_id: str) -> bytes:
        """Run a request forwarded by another coordinator; the serialized answer."""
        ...

    def wake(self) -> None:
        """Look at the queue again (dispatching may resume: the lease is current)."""
        ...


@dataclass
class _Peer:
    revision: int
    seen: float


@dataclass(frozen=True)
class ClusterOptions:
    """Timings of a :class:`Cluster` (the ``lease_*`` and ``forward_timeout`` settings).

    Attributes:
        lease_ttl: Seconds without a heartbeat after which a coordinator is dead.
        heartbeat: Seconds between two heartbeats (well below ``lease_ttl``).
        request_timeout: Seconds a request to the owner may take.
    """

    lease_ttl: float
    heartbeat: float
    request_timeout: float


class Cluster:
    """This coordinator's membership of the coordinators sharing a JetStream store.

    Args:
        store: The open JetStream store.
        instance_id: This coordinator's instance id (also its registry id).
        options: Its lease's timings and how long a request to a peer may take.
    """

    def __init__(
        self, store: JetStreamTaskStore, instance_id: str, *, options: ClusterOptions
    ) -> None:
        self._store = store
        store.instance = instance_id
        self.instance_id = instance_id
        self._options = options
        self._host: ClusterHost | None = None
        self._peers: dict[str, _Peer] = {}
        self._healthy_since: float | None = None
        self._last_beat = 0.0
        self._loops: list[asyncio.Task[None]] = []
        self._abandoned = False
        self._handlers: set[asyncio.Task[Any]] = set()
        self._sub: Any = None
        self._checks = 0

    @property
    def subject(self) -> str:
        """The subject this coordinator answers requests on."""
        return f"{CONTROL_SUBJECT}.{self.instance_id}"

    @property
    def leased(self) -> bool:
        """Whether this coordinator may dispatch: its last heartbeat is recent."""
        loop = asyncio.get_running_loop()
        return not self._abandoned and loop.time() - self._last_beat < self._options.lease_ttl / 2

    async def join(self, host: ClusterHost) -> list[TaskRow]:
        """Start heartbeating and answering requests; claim tasks nobody owns.

        Returns:
            The tasks claimed (of coordinators whose key is gone), to recover now.
        """
        self._host = host
        self._store.on_fenced = host.drop
        await self._beat()
        self._sub = await self._store.connection.subscribe(self.subject, cb=self._on_request)
        claimed = await self._claim_orphans(resume=False)
        self._loops = [
            asyncio.create_task(self._beat_loop(), name="coordinator-heartbeat"),
            asyncio.create_task(self._peer_loop(), name="coordinator-peers"),
            asyncio.create_task(self._fence_loop(), name="coordinator-fence"),
        ]
        return claimed

    async def leave(self) -> None:
        """Stop heartbeating and delete this coordinator's key: peers take over at once."""
        await cancel_and_wait(self._loops, suppress=(Exception,))
        self._loops = []
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._store.members.delete(self.instance_id)

    # -- heartbeats and takeover -----------------------------------------------------

    async def _beat_loop(self) -> None:
        # Its own loop: slow peer checks never delay a heartbeat.
        while True:
            await asyncio.sleep(self._options.heartbeat)
            await self._beat()

    async def _peer_loop(self) -> None:
        while True:
            await asyncio.sleep(self._options.heartbeat)
            if self._healthy_since is None or self._abandoned:
                continue
            try:
                await self._check_peers()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("checking the other coordinators failed")

    async def _fence_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._options.heartbeat / 2)
            silent = loop.time() - self._last_beat
            if (
                not self._abandoned
                and silent > 0.8 * self._options.lease_ttl
                and self._host is not None
            ):
                self._abandoned = True
                logger.error(
                    "no heartbeat for %.1fs: letting go of every task (peers may take them)",
                    silent,
                )
                self._host.abandon()
            elif self._abandoned and silent < self._options.heartbeat * 2:
                try:
                    claimed = await self._claim_from(self.instance_id, resume=True)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("claiming back this coordinator's tasks failed")
                    continue
                self._abandoned = False
                logger.info("heartbeats are back: %d tasks claimed back", len(claimed))

    async def _beat(self) -> bool:
        loop = asyncio.get_running_loop()
        value = json.dumps({"instance": self.instance_id, "time_ns": now_ns()}).encode()
        try:
            await asyncio.wait_for(
                self._store.members.put(self.instance_id, value), self._options.lease_ttl / 2
            )
        except Exception as exc:
            if self._healthy_since is not None:
                logger.warning("coordinator heartbeat failed: %s", exc)
            self._healthy_since = None
            return False
        now = loop.time()
        stale = not self.leased
        if self._healthy_since is None:
            self._healthy_since = now
        self._last_beat = now
        if stale and self._host is not None:
            self._host.wake()
        return True

    async def _check_peers(self) -> None:
        loop = asyncio.get_running_loop()
        members = self._store.members
        keys = set(await self._store.keys(members)) - {self.instance_id}
        # A listing may miss keys (a watcher's end-of-data marker can come early): a
        # peer is gone (a clean stop) only when a direct read says so.
        missing = {name for name in self._peers if name not in keys}
        dead = [name for name in missing if not await self._has_key(name)]
        for name in dead:
            del self._peers[name]
        keys |= missing - set(dead)
        for name in keys:
            try:
                entry = await members.get(name)
            except js_errors.KeyNotFoundError:
                dead.append(name)
                continue
            revision = entry.revision or 0
            now = loop.time()
            peer = self._peers.get(name)
            if peer is None or peer.revision != revision:
                self._peers[name] = _Peer(revision, now)
                continue
            silent = now - max(peer.seen, self._healthy_since or now)
            if silent > self._options.lease_ttl:
                logger.warning("coordinator %s missed its lease (%.1fs silent)", name, silent)
                dead.append(name)
                del self._peers[name]
        for name in dead:
            await self._take_over(name)
            with contextlib.suppress(Exception):
                await members.delete(name)
        self._checks += 1
        # Now and then, and after a death: tasks whose owner has no key at all (one
        # that left between two checks of a coordinator that never saw it, say).
        if dead or self._checks % _SWEEP_EVERY == 1:
            await self._claim_orphans(resume=True)

    async def _claim_orphans(self, *, resume: bool) -> list[TaskRow]:
        """Claim the tasks of owners with no key (gone for good, or never clustered)."""
        live = set(await self._store.keys(self._store.members)) | {self.instance_id}
        owners = await self._store.active_owners()
        claimed: list[TaskRow] = []
        for owner in owners:
            previous = "" if owner == "none" else owner
            if previous in live or (previous and await self._has_key(previous)):
                continue
            claimed += await self._claim_from(previous, resume=resume)
        return claimed

    async def _has_key(self, name: str) -> bool:
        """Whether a coordinator's heartbeat key exists (a direct read, authoritative)."""
        try:
            await self._store.members.get(name)
        except js_errors.KeyNotFoundError:
            return False
        return True

    async def _take_over(self, previous: str) -> None:
        started = asyncio.get_running_loop().time()
        claimed = await self._claim_from(previous, resume=True)
        if claimed:
            took = asyncio.get_running_loop().time() - started
            logger.info(
                "took over %d tasks of coordinator %s in %.2fs", len(claimed), previous, took
            )

    async def _claim_from(self, previous: str, *, resume: bool) -> list[TaskRow]:
        """Claim a dead coordinator's tasks, a family at a time (root first)."""
        rows = await self._store.owned_tasks(previous)
        by_id = {row.task_id: row for row in rows}
        families: dict[str, list[TaskRow]] = {}
        for row in rows:
            root = row
            while root.parent_task_id in by_id:
                root = by_id[root.parent_task_id]
            families.setdefault(root.task_id, []).append(row)
        order = list(families)
        random.shuffle(order)  # peers racing for the same tasks spread them out
        claimed: list[TaskRow] = []
        for root_id in order:
            family = sorted(families[root_id], key=lambda r: r.task_id != root_id)
            first = await self._store.claim(root_id, self.instance_id, {previous})
            if first is None:
                continue  # another coordinator won this family
            claimed.append(first)
            for row in family[1:]:
                taken = await self._store.claim(row.task_id, self.instance_id, {previous})
                if taken is not None:
                    claimed.append(taken)
        if claimed and resume and self._host is not None:
            await self._host.take_over(claimed, previous)
        return claimed

    def forget(self, task_id: str) -> None:
        """Forget what the store cached of a task this coordinator let go."""
        self._store.forget(task_id)

    def follow_events(self, task_id: str, after: int) -> AsyncGenerator[EventRow | None, None]:
        """A task's events after ``after`` as they are stored, whoever runs it."""
        return self._store.follow_events(task_id, after)

    # -- requests to the owner -------------------------------------------------------

    async def request(
        self, owner: str, op: str, body: bytes, *, caller: str, correlation_id: str = ""
    ) -> bytes:
        """Ask the coordinator that owns a task to run ``op``; its serialized answer.

        Raises:
            HivewireError: The owner refused (its error, as it raised it).
            Unavailable: The owner did not answer (it may be dying: retry after the
                lease has expired and a peer took the task over).
        """
        headers = {_OP: op, _CALLER: caller, _CORRELATION: correlation_id}
        try:
            reply = await self._store.connection.request(
                f"{CONTROL_SUBJECT}.{owner}",
                body,
                timeout=self._options.request_timeout,
                headers=headers,
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(
                f"coordinator {owner}, which runs the task, did not answer; retry",
                retry_after=self._options.lease_ttl,
            ) from exc
        if (reply.headers or {}).get(_ERROR):
            raise from_rpc_status(status_pb2.Status.FromString(reply.data))
        data: bytes = reply.data
        return data

    async def _on_request(self, msg: Any) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _answer(self, msg: Any) -> None:
        headers = msg.headers or {}
        host = self._host
        try:
            if host is None:
                raise Unavailable("coordinator is starting", retry_after=1.0)
            body = await host.answer(
                headers.get(_OP, ""),
                headers.get(_CALLER, ""),
                bytes(msg.data or b""),
                headers.get(_CORRELATION, ""),
            )
        except HivewireError as err:
            await self._respond(msg, to_rpc_status(err).SerializeToString(), error=True)
            return
        except Exception:
            logger.exception("forwarded %s failed", headers.get(_OP))
            internal = Internal("the owning coordinator failed on a forwarded request")
            await self._respond(msg, to_rpc_status(internal).SerializeToString(), error=True)
            return
        await self._respond(msg, body, error=False)

    async def _respond(self, msg: Any, body: bytes, *, error: bool) -> None:
        if not msg.reply:
            return
        with contextlib.suppress(Exception):
            await self._store.connection.publish(
                msg.reply, body, headers={_ERROR: "1"} if error else None
            )
