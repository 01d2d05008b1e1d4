"""The distributed task store: task state and journals on NATS JetStream.

The same :class:`~hivewire.services.coordinator.store.TaskStore` contract as the SQLite
backend (``tests/unit/test_coordinator_store.py`` runs against both), on the NATS
deployment the mesh already has:

* **Tasks** are entries of the KV bucket ``<prefix>_TASKS`` (key = task id), written
  with revision compare-and-set: this store remembers the revision of its last write of
  each task and updates with it, so a write that raced another writer fails with
  :class:`StoreError` instead of silently overwriting it.
* **Journals**: each task's events are messages on its own subject
  ``hivewire.journal.<task id>`` of the stream ``<prefix>_JOURNAL``, published with
  ``Nats-Msg-Id: <task id>:<sequence>`` (a re-sent event is stored once) and the
  task's sequence in the ``Hivewire-Sequence`` header, so the per-task sequence stays
  the contract's gap-free 1, 2, 3...
* **Idempotency keys** are entries of ``<prefix>_IDEMPOTENCY`` created with CAS (``create``
  fails when the key exists): of two submissions with the same key, one wins.
* **Projects** are entries of ``<prefix>_PROJECTS``; purged tasks leave a tombstone in
  ``<prefix>_PURGED``.
* **The event outbox** is the journal itself: an event's outbox entry rides in its
  journal message (header ``Hivewire-Outbox``), so it is stored exactly when the event
  is. The relay reads the journal in stream order through an ephemeral consumer that
  delivers headers only, and keeps how far it published in ``<prefix>_OUTBOX``
  (key ``relay``; the position is the journal's stream sequence).

Replication is a setting (``replicas=1`` on one server, 3 in a cluster). Writes and
reads go through one queue processed in order, so a read issued after a write sees it.
While NATS reconnects or a stream elects a leader, each operation is retried (the
queue waits): writes stay idempotent under retry (events by ``Nats-Msg-Id``, a
compare-and-set whose answer was lost is recognised by the value it wrote).

Several coordinators share one store (:mod:`.cluster`): each task row names the
coordinator that owns it, and every write of a row is a compare-and-set on the
revision that coordinator last wrote, so a coordinator that lost a task to a takeover
is fenced off (its next write fails and :attr:`JetStreamTaskStore.on_fenced` is
called). ``<prefix>_ACTIVE`` indexes unfinished tasks by owner (key
``<coordinator>.<task id>``): recovery and takeover read it instead of scanning every
task; ``<prefix>_COORDINATORS`` holds the coordinators' heartbeats.

Not built yet: listings (ListTasks, children, projects, purges) scan the task bucket
(O(tasks)).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import nats
import nats.errors
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from hivewire.services.base.lifecycle import OpenClose
from hivewire.services.coordinator.store import (
    TERMINAL_STATES,
    EventRow,
    OutboxItem,
    ProjectRow,
    ProjectSummary,
    StoreError,
    TaskQuery,
    TaskRow,
    Tombstone,
    consume_exception,
    settle,
)

logger = logging.getLogger(__name__)

__all__ = ["JetStreamTaskStore"]

T = TypeVar("T")

JOURNAL_SUBJECT = "hivewire.journal"
SEQUENCE_HEADER = "Hivewire-Sequence"
_SETUP_TIMEOUT = 60.0
"""Seconds opening the store may take (creating its buckets and stream)."""
_DROPPED_KEPT = 100_000
"""Tasks let go whose late writes are still recognised and dropped."""
OUTBOX_HEADER = "Hivewire-Outbox"
"""Header of a journal message carrying the event's outbox entry (base64)."""
_OUTBOX_CURSOR = "relay"
_OUTBOX_FETCH_WAIT = 5.0
_INDEX_CACHE = 4096
"""Tasks whose journal index (task sequence -> stream sequence) stays in memory."""
# Listing keys: messages per fetch; seconds before an abandoned listing consumer goes.
_KEYS_BATCH = 256
_KEYS_INACTIVE = 30.0


@dataclass(frozen=True)
class _Buckets:
    """The store's KV buckets, all opened together by :meth:`JetStreamTaskStore.open`."""

    tasks: KeyValue
    keys: KeyValue
    projects: KeyValue
    tombstones: KeyValue
    outbox: KeyValue
    active: KeyValue
    members: KeyValue


@dataclass
class _Item:
    run: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


class JetStreamTaskStore(OpenClose):
    """The JetStream task store (an async context manager).

    Args:
        servers: NATS URLs.
        prefix: Name prefix of the buckets and the stream.
        replicas: JetStream replicas of each (1 on one server, 3 in a cluster).
        connect: Extra ``nats.connect`` keyword arguments (TLS context, name...).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        prefix: str = "HIVEWIRE",
        replicas: int = 1,
        connect: dict[str, Any] | None = None,
    ) -> None:
        self._servers = [servers] if isinstance(servers, str) else list(servers)
        self._prefix = prefix
        self._replicas = replicas
        self._connect = dict(connect or {})
        self._nc: Any = None
        self._js: Any = None
        self._opened: _Buckets | None = None
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        # Revision and spec of each unfinished task this store wrote or read: forgotten
        # when the task is written finished (it is read back from the bucket if needed).
        self._revisions: dict[str, int] = {}
        self._specs: dict[str, bytes] = {}
        self._index: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._closed = False
        #: Called with a task's id when a write of it lost to another coordinator's.
        self.on_fenced: Callable[[str], None] | None = None
        #: The coordinator instance writing through this store ("" when it is alone).
        self.instance = ""
        # Tasks this coordinator let go (taken over, or its lease lapsed): their queued
        # and retried writes are dropped, never applied after a peer's.
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self._outbox_sub: Any = None
        self._outbox_consumer = ""
        self._outbox_last = -1  # the last journal message the consumer delivered
        self._outbox_returned = -1  # the position of the last item returned
        self._outbox_expected = 1  # the consumer sequence of the next message

    @property
    def _buckets(self) -> _Buckets:
        """The open buckets.

        Raises:
            StoreError: The store was never opened.
        """
        if self._opened is None:
            raise StoreError("task store is not open")
        return self._opened

    @property
    def stream(self) -> str:
        """The journal stream's name."""
        return f"{self._prefix}_JOURNAL"

    async def open(self) -> None:
        """Connect, create the buckets and the stream if needed, start the worker.

        Raises:
            StoreError: NATS cannot be reached or JetStream refused the setup.
        """
        if self._worker is not None:
            raise StoreError("store already open")
        try:
            self._nc = await nats.connect(
                servers=self._servers, connect_timeout=5, max_reconnect_attempts=-1, **self._connect
            )
            self._js = self._nc.jetstream()
            # A cluster busy creating the same replicated streams for several
            # coordinators at once answers slowly: setup calls are retried for a while.
            async with asyncio.timeout(_SETUP_TIMEOUT):
                tasks = await self._retry(lambda: self._bucket("TASKS"))
                keys = await self._retry(lambda: self._bucket("IDEMPOTENCY"))
                projects = await self._retry(lambda: self._bucket("PROJECTS"))
                tombstones = await self._retry(lambda: self._bucket("PURGED"))
                outbox = await self._retry(lambda: self._bucket("OUTBOX"))
                indexed = await self._retry(lambda: self._exists("ACTIVE"))
                active = await self._retry(lambda: self._bucket("ACTIVE"))
                members = await self._retry(lambda: self._bucket("COORDINATORS"))
                self._opened = _Buckets(tasks, keys, projects, tombstones, outbox, active, members)
                if not indexed:
                    await self._index_existing()
                await self._retry(
                    lambda: self._js.add_stream(
                        js_api.StreamConfig(
                            name=self.stream,
                            subjects=[f"{JOURNAL_SUBJECT}.>"],
                            num_replicas=self._replicas,
                            duplicate_window=120,
                        )
                    )
                )
        except Exception as exc:
            await self._disconnect()
            raise StoreError(f"cannot open the JetStream task store: {exc}") from exc
        self._worker = asyncio.create_task(self._work(), name="coordinator-jetstream-store")
        logger.info(
            "JetStream task store open (prefix %s, replicas %d)", self._prefix, self._replicas
        )

    async def _exists(self, name: str) -> bool:
        try:
            await self._js.key_value(f"{self._prefix}_{name}")
        except js_errors.BucketNotFoundError:
            return False
        return True

    async def _index_existing(self) -> None:
        """Index the unfinished tasks of a store written before the index existed."""
        for row in await self._all_rows():
            if row.state not in TERMINAL_STATES:
                await self._index_active(row)

    async def _bucket(self, name: str) -> KeyValue:
        bucket: KeyValue = await self._js.create_key_value(
            bucket=f"{self._prefix}_{name}", history=1, replicas=self._replicas
        )
        return bucket

    async def close(self) -> None:
        """Finish what is queued, stop the worker and disconnect (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        await self._outbox_unsubscribe()
        await self._disconnect()

    async def _disconnect(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None

    # -- the queue -------------------------------------------------------------------

    def _submit(self, run: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        if self._closed or self._worker is None:
            raise StoreError("task store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(run, future))
        return future

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            try:
                result = await item.run()
            except StoreError as exc:
                settle(item.future, None, exc)
            except Exception as exc:
                logger.exception("JetStream task store operation failed")
                settle(item.future, None, StoreError(str(exc)))
            else:
                settle(item.future, result, None)

    # -- writes ----------------------------------------------------------------------

    def put(
        self, *, tasks: Sequence[TaskRow] = (), events: Sequence[EventRow] = ()
    ) -> asyncio.Future[None]:
        """Queue task upserts and event appends; the future resolves once stored."""
        future: asyncio.Future[None] = self._submit(lambda: self._write(tasks, events))
        future.add_done_callback(consume_exception)
        return future

    async def flush(self) -> None:
        """Wait until every write queued so far is stored."""
        await self._submit(_nothing)

    async def _write(self, tasks: Sequence[TaskRow], events: Sequence[EventRow]) -> None:
        dropped = {t.task_id for t in tasks} | {e.task_id for e in events}
        dropped &= self._dropped.keys()
        if dropped:
            # Let go while the write waited: it must fail, never look stored (a submit
            # answered "accepted" has to be in the store).
            raise StoreError(f"tasks {sorted(dropped)} were let go; their writes are dropped")
        latest: dict[str, TaskRow] = {}
        for task in tasks:
            latest[task.task_id] = task
        # Idempotency keys first: a task whose key belongs to another task is not stored.
        claimed = [
            t for t in latest.values() if t.idempotency_key and t.task_id not in self._revisions
        ]
        for task in claimed:
            await self._claim_key(task)
        try:
            await self._append(latest, events)
        except StoreError:
            # Not stored after all (let go meanwhile): its key must not stay taken by a
            # task that does not exist.
            for task in claimed:
                await self._release_key(task)
            raise

    async def _release_key(self, task: TaskRow) -> None:
        name = _key_name(task.owner, task.idempotency_key)
        with contextlib.suppress(Exception):
            entry = await self._buckets.keys.get(name)
            if entry.value == task.task_id.encode():
                await self._buckets.keys.delete(name, last=entry.revision)

    async def _append(self, latest: dict[str, TaskRow], events: Sequence[EventRow]) -> None:
        for event in events:
            ack = await self._retry(
                task_id=event.task_id,
                op=partial(
                    self._js.publish,
                    f"{JOURNAL_SUBJECT}.{event.task_id}",
                    event.data,
                    headers={
                        "Nats-Msg-Id": f"{event.task_id}:{event.sequence}",
                        SEQUENCE_HEADER: str(event.sequence),
                        **_outbox_header(event),
                    },
                ),
            )
            index = self._index.get(event.task_id)
            if index is not None:
                index[event.sequence] = ack.seq
        for task in latest.values():
            await self._put_row(task)

    async def _claim_key(self, task: TaskRow) -> None:
        key = _key_name(task.owner, task.idempotency_key)
        try:
            await self._retry(lambda: self._buckets.keys.create(key, task.task_id.encode()))
        except js_errors.KeyWrongLastSequenceError:
            holder = await self._retry(lambda: self._buckets.keys.get(key))
            if holder.value is None or holder.value.decode() != task.task_id:
                raise StoreError(
                    f"idempotency key {task.idempotency_key!r} of {task.owner} belongs to "
                    f"another task"
                ) from None

    async def _put_row(self, task: TaskRow) -> None:
        revision = self._revisions.get(task.task_id)
        if revision is None:
            if task.state not in TERMINAL_STATES:
                # Indexed before it exists: a crash in between leaves an index entry
                # without a task (skipped), never a task nobody finds.
                await self._index_active(task)
            try:
                self._revisions[task.task_id] = await self._retry(
                    lambda: self._buckets.tasks.create(task.task_id, _encode(task)),
                    task_id=task.task_id,
                )
                self._specs[task.task_id] = task.spec
                self._forget_if_finished(task)
                return
            except js_errors.KeyWrongLastSequenceError:
                # Written before (by this process before a restart, or another one).
                entry = await self._retry(lambda: self._buckets.tasks.get(task.task_id))
                if entry.value is None or entry.revision is None:
                    raise StoreError(f"task {task.task_id} vanished while written") from None
                revision = entry.revision
                stored = _decode(entry.value)
                if stored.coordinator != task.coordinator:
                    # Another coordinator took the task over: this writer is fenced off.
                    if self.on_fenced is not None:
                        self.on_fenced(task.task_id)
                    raise StoreError(
                        f"task {task.task_id} is owned by {stored.coordinator or 'nobody'}"
                    ) from None
                # The spec is written once, never replaced.
                task = _with_spec(task, stored.spec)
        else:
            cached = self._specs.get(task.task_id)
            if cached is not None:
                task = _with_spec(task, cached)
        try:
            self._revisions[task.task_id] = await self._update(
                self._buckets.tasks, task.task_id, _encode(task), revision, task_id=task.task_id
            )
        except js_errors.KeyWrongLastSequenceError as exc:
            self._revisions.pop(task.task_id, None)
            self._specs.pop(task.task_id, None)
            if self.on_fenced is not None:
                self.on_fenced(task.task_id)
            raise StoreError(
                f"task {task.task_id} was changed by another writer (revision {revision})"
            ) from exc
        if task.state in TERMINAL_STATES:
            await self._unindex_active(task.coordinator, task.task_id)
        self._forget_if_finished(task)

    async def _retry(self, op: Callable[[], Awaitable[T]], *, task_id: str = "") -> T:
        """Run a NATS operation, again while NATS is unreachable or electing a leader.

        Writes are idempotent under retry: journal events carry a ``Nats-Msg-Id``, and a
        compare-and-set that may have landed before its answer was lost is checked by
        :meth:`_update`. The store's queue waits meanwhile (its writes stay in order).
        """
        delay = 0.05
        while True:
            if task_id in self._dropped:
                raise StoreError(f"task {task_id} was let go; its write is dropped")
            try:
                return await op()
            except _TRANSIENT as exc:
                if self._closed or self._nc is None or self._nc.is_closed:
                    raise
                logger.warning(
                    "JetStream unavailable (%s); retrying in %.2fs", type(exc).__name__, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def keys(self, bucket: KeyValue, pattern: str = ">") -> list[str]:
        """The live keys of one of the store's open buckets (:func:`list_keys`).

        Listed again while JetStream is unreachable or electing the bucket's leader
        (a coordinator that starts with a cluster that is still forming waits for it).
        """
        return await self._retry(lambda: list_keys(bucket, pattern))

    async def _update(
        self, bucket: KeyValue, key: str, value: bytes, last: int, *, task_id: str = ""
    ) -> int:
        """A compare-and-set update, retried; its new revision.

        Raises:
            KeyWrongLastSequenceError: Another writer changed the key (a retry whose
                first try had landed is told apart by the value it wrote).
        """
        try:
            revision: int = await self._retry(
                lambda: bucket.update(key, value, last=last), task_id=task_id
            )
        except js_errors.KeyWrongLastSequenceError:
            entry = await self._retry(lambda: bucket.get(key))
            if entry.value != value or entry.revision is None:
                raise
            revision = entry.revision
        return revision

    def _forget_if_finished(self, task: TaskRow) -> None:
        if task.state in TERMINAL_STATES:
            self._revisions.pop(task.task_id, None)
            self._specs.pop(task.task_id, None)

    # -- reads -----------------------------------------------------------------------

    async def _get_row(self, task_id: str) -> TaskRow | None:
        try:
            entry = await self._retry(lambda: self._buckets.tasks.get(task_id))
        except js_errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        row = _decode(entry.value)
        # Remembered only for the tasks this store's coordinator owns (and writes).
        if (
            entry.revision is not None
            and row.state not in TERMINAL_STATES
            and row.coordinator == self.instance
        ):
            self._revisions[task_id] = entry.revision
            self._specs[task_id] = row.spec
        return row

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task's row, or None."""
        result: TaskRow | None = await self._submit(lambda: self._get_row(task_id))
        return result

    async def find_by_idempotency_key(self, owner: str, key: str) -> TaskRow | None:
        """The task an owner submitted with an idempotency key, if any."""

        async def run() -> TaskRow | None:
            value = await _value(self._buckets.keys, _key_name(owner, key))
            return None if value is None else await self._get_row(value.decode())

        result: TaskRow | None = await self._submit(run)
        return result

    async def _all_rows(self) -> list[TaskRow]:
        rows = []
        for key in await self.keys(self._buckets.tasks):
            row = await self._get_row(key)
            if row is not None:
                rows.append(row)
        return rows

    async def active_tasks(self) -> list[TaskRow]:
        """Every task not in a terminal state, oldest first."""

        async def run() -> list[TaskRow]:
            ids = {task_id for ids in (await self._active_index()).values() for task_id in ids}
            rows = [r for r in [await self._get_row(i) for i in ids] if r is not None]
            rows = [r for r in rows if r.state not in TERMINAL_STATES]
            return sorted(rows, key=lambda r: (r.created_ns, r.task_id))

        result: list[TaskRow] = await self._submit(run)
        return result

    async def list_tasks(self, query: TaskQuery) -> list[TaskRow]:
        """Tasks matching a query, newest first."""

        def wanted(r: TaskRow) -> bool:
            return (
                (not query.states or r.state in query.states)
                and (not query.capability or r.capability == query.capability)
                and (not query.owner or r.owner == query.owner)
                and (not query.parent_task_id or r.parent_task_id == query.parent_task_id)
                and (not query.project_id or r.project_id == query.project_id)
                and (query.before is None or (r.created_ns, r.task_id) < query.before)
            )

        async def run() -> list[TaskRow]:
            rows = [r for r in await self._all_rows() if wanted(r)]
            rows.sort(key=lambda r: (r.created_ns, r.task_id), reverse=True)
            return rows[: max(query.limit, 0)]

        result: list[TaskRow] = await self._submit(run)
        return result

    async def children(self, parent_task_id: str) -> list[TaskRow]:
        """Every step and sub-task of a task, oldest first."""

        async def run() -> list[TaskRow]:
            rows = [r for r in await self._all_rows() if r.parent_task_id == parent_task_id]
            return sorted(rows, key=lambda r: (r.created_ns, r.task_id))

        result: list[TaskRow] = await self._submit(run)
        return result

    async def _journal_index(self, task_id: str) -> dict[int, int]:
        """Task sequence -> stream sequence of a task's events.

        Cached (and kept current by this store's writes) for the unfinished tasks this
        store writes; read afresh for others, whose journals another coordinator may
        be appending to.
        """
        index = self._index.get(task_id)
        if index is not None:
            self._index.move_to_end(task_id)
            return index
        index = {}
        async for msg in self._journal(task_id):
            headers = msg.headers or {}
            index[int(headers.get(SEQUENCE_HEADER, "0"))] = msg.seq
        if task_id not in self._revisions:
            return index
        self._index[task_id] = index
        while len(self._index) > _INDEX_CACHE:
            self._index.popitem(last=False)
        return index

    async def events_after(
        self, task_id: str, after: int, *, until: int | None = None, limit: int = 1000
    ) -> list[EventRow]:
        """A task's events with ``after < sequence <= until``, in order."""

        async def run() -> list[EventRow]:
            if task_id not in self._index and task_id not in self._revisions:
                return await self._read_journal(task_id, after, until, limit)
            index = await self._journal_index(task_id)
            wanted = sorted(n for n in index if n > after and (until is None or n <= until))
            rows = []
            for n in wanted[: max(limit, 0)]:
                msg = await self._retry(partial(self._js.get_msg, self.stream, seq=index[n]))
                rows.append(EventRow(task_id, n, bytes(msg.data or b"")))
            return rows

        result: list[EventRow] = await self._submit(run)
        return result

    async def _read_journal(
        self, task_id: str, after: int, until: int | None, limit: int
    ) -> list[EventRow]:
        """Events of a task this store keeps no index of, read in one pass."""
        found: dict[int, EventRow] = {}
        if limit > 0:
            async with contextlib.aclosing(self._journal(task_id)) as messages:
                async for msg in messages:
                    n = int((msg.headers or {}).get(SEQUENCE_HEADER, "0"))
                    if n > after and (until is None or n <= until):
                        found.setdefault(n, EventRow(task_id, n, bytes(msg.data or b"")))
                    if len(found) >= limit:
                        break
        return [found[n] for n in sorted(found)][: max(limit, 0)]

    async def _journal(self, task_id: str) -> AsyncGenerator[Any, None]:
        """The journal messages of one task, in stream order."""
        subject = f"{JOURNAL_SUBJECT}.{task_id}"
        seq = 1
        while True:
            try:
                msg = await self._retry(
                    partial(self._js.get_msg, self.stream, seq=seq, subject=subject, next=True)
                )
            except js_errors.NotFoundError:
                return
            yield msg
            seq = msg.seq + 1

    async def last_sequence(self, task_id: str) -> int:
        """The sequence of a task's latest stored event (0 when none)."""

        async def run() -> int:
            index = self._index.get(task_id)
            if index is not None:
                return max(index, default=0)
            # One read of the subject's last message, not a walk of the journal.
            try:
                msg = await self._retry(
                    lambda: self._js.get_last_msg(self.stream, f"{JOURNAL_SUBJECT}.{task_id}")
                )
            except js_errors.NotFoundError:
                return 0
            return int((msg.headers or {}).get(SEQUENCE_HEADER, "0"))

        result: int = await self._submit(run)
        return result

    async def count_tasks(self) -> int:
        """How many tasks are stored."""

        async def run() -> int:
            return len(await self.keys(self._buckets.tasks))

        result: int = await self._submit(run)
        return result

    # -- several coordinators: ownership, takeover, live journals ----------------------

    @property
    def members(self) -> KeyValue:
        """The ``<prefix>_COORDINATORS`` bucket (coordinator heartbeats, see cluster.py)."""
        return self._buckets.members

    @property
    def connection(self) -> Any:
        """The store's NATS connection (shared by the cluster's requests)."""
        if self._nc is None:
            raise StoreError("task store is closed")
        return self._nc

    async def _index_active(self, task: TaskRow) -> None:
        key = _active_key(task.coordinator, task.task_id)
        await self._retry(lambda: self._buckets.active.put(key, b""))

    async def _unindex_active(self, coordinator: str, task_id: str) -> None:
        with contextlib.suppress(js_errors.KeyNotFoundError):
            key = _active_key(coordinator, task_id)
            await self._retry(lambda: self._buckets.active.delete(key))

    async def _active_index(self, coordinator: str = "") -> dict[str, list[str]]:
        pattern = f"{_owner_token(coordinator)}.*" if coordinator else ">"
        index: dict[str, list[str]] = {}
        for key in await self.keys(self._buckets.active, pattern):
            owner, _, task_id = key.partition(".")
            index.setdefault(owner, []).append(task_id)
        return index

    async def active_owners(self) -> dict[str, list[str]]:
        """Ids of the unfinished tasks of each owning coordinator ("none" for none)."""
        result: dict[str, list[str]] = await self._submit(self._active_index)
        return result

    async def owned_tasks(self, coordinator: str) -> list[TaskRow]:
        """The unfinished tasks a coordinator owns, oldest first."""

        async def run() -> list[TaskRow]:
            ids = (await self._active_index(coordinator)).get(_owner_token(coordinator), [])
            rows = []
            for task_id in ids:
                row = await self._get_row(task_id)
                if row is None or row.state in TERMINAL_STATES:
                    await self._unindex_active(coordinator, task_id)  # a stale entry
                elif row.coordinator == coordinator:
                    rows.append(row)
            return sorted(rows, key=lambda r: (r.created_ns, r.task_id))

        result: list[TaskRow] = await self._submit(run)
        return result

    async def claim(
        self, task_id: str, coordinator: str, previous: Collection[str]
    ) -> TaskRow | None:
        """Take an unfinished task over from one of ``previous`` owners (revision CAS).

        Returns:
            The task's row, now owned by ``coordinator``; None when it finished, is
            owned by someone else, or another coordinator claimed it first.
        """

        async def run() -> TaskRow | None:
            try:
                entry = await self._retry(lambda: self._buckets.tasks.get(task_id))
            except js_errors.KeyNotFoundError:
                return None
            if entry.value is None or entry.revision is None:
                return None
            row = _decode(entry.value)
            if row.state in TERMINAL_STATES or row.coordinator not in previous:
                return None
            fields = asdict(row)
            fields["coordinator"] = coordinator
            claimed = TaskRow(**fields)
            await self._index_active(claimed)
            try:
                revision = await self._update(
                    self._buckets.tasks, task_id, _encode(claimed), entry.revision
                )
            except js_errors.KeyWrongLastSequenceError:
                await self._unindex_active(coordinator, task_id)
                return None
            if row.coordinator != coordinator:
                await self._unindex_active(row.coordinator, task_id)
            self._dropped.pop(task_id, None)
            self._revisions[task_id] = revision
            self._specs[task_id] = row.spec
            self._index.pop(task_id, None)  # others appended events: re-read the journal
            return claimed

        result: TaskRow | None = await self._submit(run)
        return result

    def forget(self, task_id: str) -> None:
        """Let go of a task: drop its pending writes and what this store remembers of it.

        Until this coordinator claims it back (:meth:`claim`), writes of it are dropped.
        """
        self._dropped[task_id] = None
        while len(self._dropped) > _DROPPED_KEPT:
            self._dropped.popitem(last=False)
        self._revisions.pop(task_id, None)
        self._specs.pop(task_id, None)
        self._index.pop(task_id, None)

    async def follow_events(
        self, task_id: str, after: int, *, idle: float = 1.0
    ) -> AsyncGenerator[EventRow | None, None]:
        """A task's stored events after ``after``, then each new one as it is stored.

        Whichever coordinator writes them: this is how a coordinator follows a task
        another one runs. Yields None after ``idle`` seconds without an event (so the
        caller can check whether to stop); never ends by itself.
        """
        index = await self._submit(lambda: self._journal_index(task_id))
        start = index.get(after, 0) + 1 if after else 1
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def deliver(msg: Any) -> None:
            await queue.put(msg)

        # Made again while the stream has no leader (a NATS node just died), as every
        # other read is: a watcher resumed on this coordinator then waits, not fails.
        sub = await self._retry(
            partial(
                self._js.subscribe,
                f"{JOURNAL_SUBJECT}.{task_id}",
                stream=self.stream,
                cb=deliver,
                ordered_consumer=True,
                config=js_api.ConsumerConfig(
                    deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                ),
            )
        )
        last = after
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), idle)
                except TimeoutError:
                    yield None
                    continue
                sequence = int((msg.headers or {}).get(SEQUENCE_HEADER, "0"))
                if sequence <= last:
                    continue  # an event the caller has (a takeover re-sent it)
                last = sequence
                yield EventRow(task_id, sequence, bytes(msg.data or b""))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- projects --------------------------------------------------------------------

    async def put_project(self, project: ProjectRow) -> None:
        """Store a new project."""

        async def run() -> None:
            value = json.dumps(
                {**asdict(project), "data": base64.b64encode(project.data).decode()}
            ).encode()
            try:
                await self._buckets.projects.create(project.project_id, value)
            except js_errors.KeyWrongLastSequenceError as exc:
                raise StoreError(f"project {project.project_id} exists") from exc

        await self._submit(run)

    async def _projects_all(self) -> list[ProjectRow]:
        rows = []
        for key in await self.keys(self._buckets.projects):
            entry = await self._buckets.projects.get(key)
            if entry.value is not None:
                rows.append(_project(entry.value))
        return rows

    async def get_project(self, project_id: str) -> ProjectRow | None:
        """A project's row, or None."""

        async def run() -> ProjectRow | None:
            value = await _value(self._buckets.projects, project_id)
            return None if value is None else _project(value)

        result: ProjectRow | None = await self._submit(run)
        return result

    async def list_projects(
        self, *, owner: str, before: tuple[int, str] | None, limit: int
    ) -> list[ProjectRow]:
        """Projects newest first, of one owner ("" for all)."""

        async def run() -> list[ProjectRow]:
            rows = [
                p
                for p in await self._projects_all()
                if (not owner or p.owner == owner)
                and (before is None or (p.created_ns, p.project_id) < before)
            ]
            rows.sort(key=lambda p: (p.created_ns, p.project_id), reverse=True)
            return rows[: max(limit, 0)]

        result: list[ProjectRow] = await self._submit(run)
        return result

    async def project_summary(self, project_id: str) -> ProjectSummary:
        """Aggregates over a project's tasks (rows: its root tasks)."""

        async def run() -> ProjectSummary:
            counts: dict[int, int] = {}
            roots = []
            for row in await self._all_rows():
                if row.project_id != project_id:
                    continue
                counts[row.state] = counts.get(row.state, 0) + 1
                if not row.parent_task_id:
                    roots.append(row)
            roots.sort(key=lambda r: r.created_ns)
            return ProjectSummary(counts, roots)

        result: ProjectSummary = await self._submit(run)
        return result

    # -- retention -------------------------------------------------------------------

    async def release_idempotency_key(self, owner: str, key: str, task_id: str) -> None:
        """Take an expired idempotency key off the task that holds it."""

        async def run() -> None:
            name = _key_name(owner, key)
            try:
                entry = await self._buckets.keys.get(name)
            except js_errors.KeyNotFoundError:
                return
            if entry.value is not None and entry.value.decode() == task_id:
                await self._buckets.keys.delete(name, last=entry.revision)
            row = await self._get_row(task_id)
            if row is not None and row.idempotency_key == key:
                fields = asdict(row)
                fields["idempotency_key"] = ""
                stored = await self._buckets.tasks.get(task_id)
                await self._buckets.tasks.update(
                    task_id, _encode(TaskRow(**fields)), last=stored.revision
                )

        await self._submit(run)

    async def purge_finished(self, before_ns: int, *, limit: int, now: int) -> int:
        """Delete up to ``limit`` tasks finished before ``before_ns`` with their journals.

        Each leaves a tombstone stamped ``now``. Runs in the store's queue, between
        other operations, a task at a time (there is no multi-key transaction).
        """

        async def run() -> int:
            victims = sorted(
                (
                    r
                    for r in await self._all_rows()
                    if r.state in TERMINAL_STATES and r.updated_ns < before_ns
                ),
                key=lambda r: r.updated_ns,
            )[: max(limit, 0)]
            for row in victims:
                await self._buckets.tombstones.put(
                    row.task_id,
                    json.dumps({"owner": row.owner, "purged_ns": now}).encode(),
                )
                await self._js.purge_stream(self.stream, subject=f"{JOURNAL_SUBJECT}.{row.task_id}")
                if row.idempotency_key:
                    with contextlib.suppress(js_errors.KeyNotFoundError):
                        name = _key_name(row.owner, row.idempotency_key)
                        entry = await self._buckets.keys.get(name)
                        if entry is not None and entry.value == row.task_id.encode():
                            await self._buckets.keys.delete(name)
                await self._buckets.tasks.purge(row.task_id)
                self._index.pop(row.task_id, None)
                self._revisions.pop(row.task_id, None)
                self._specs.pop(row.task_id, None)
            return len(victims)

        result: int = await self._submit(run)
        return result

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]:
        """Delete finished tasks and their journals; returns the ids deleted."""

        async def run() -> list[str]:
            deleted = []
            for task_id in dict.fromkeys(task_ids):
                row = await self._get_row(task_id)
                if row is None or row.state not in TERMINAL_STATES:
                    continue
                await self._js.purge_stream(self.stream, subject=f"{JOURNAL_SUBJECT}.{task_id}")
                await self._buckets.tasks.purge(task_id)
                self._index.pop(task_id, None)
                deleted.append(task_id)
            return deleted

        result: list[str] = await self._submit(run)
        return result

    async def prune_tombstones(self, before_ns: int, *, limit: int) -> int:
        """Delete up to ``limit`` tombstones made before ``before_ns``; how many."""

        async def run() -> int:
            old = []
            for key in await self.keys(self._buckets.tombstones):
                entry = await self._buckets.tombstones.get(key)
                if entry.value is not None:
                    purged = int(json.loads(entry.value)["purged_ns"])
                    if purged < before_ns:
                        old.append((purged, key))
            old.sort()
            for _, key in old[: max(limit, 0)]:
                await self._buckets.tombstones.purge(key)
            return min(len(old), max(limit, 0))

        result: int = await self._submit(run)
        return result

    async def tombstone(self, task_id: str) -> Tombstone | None:
        """The tombstone of a purged task, or None."""

        async def run() -> Tombstone | None:
            value = await _value(self._buckets.tombstones, task_id)
            if value is None:
                return None
            fields = json.loads(value)
            return Tombstone(task_id, fields["owner"], int(fields["purged_ns"]))

        result: Tombstone | None = await self._submit(run)
        return result

    # -- the event outbox ------------------------------------------------------------

    async def outbox_next(self, after: int, *, limit: int) -> list[OutboxItem]:
        """Journal messages past stream sequence ``after`` that carry an outbox entry.

        ``after`` 0 starts after the position recorded by :meth:`outbox_done`. Waits
        until there is at least one.
        """
        while True:
            if self._closed:
                raise StoreError("task store is closed")
            try:
                if self._outbox_sub is None or after not in (
                    self._outbox_last,
                    self._outbox_returned,
                ):
                    await self._outbox_subscribe(after)
                try:
                    msgs = await self._outbox_sub.fetch(limit, timeout=_OUTBOX_FETCH_WAIT)
                except nats.errors.TimeoutError:
                    # Nothing new, or the consumer is gone (a NATS restart): ask.
                    await self._outbox_sub.consumer_info()
                    continue
            except Exception as exc:
                # The consumer is gone (a NATS restart): a new one starts where this was.
                logger.warning("outbox: journal consumer failed (%s); re-creating", exc)
                await self._outbox_unsubscribe()
                await asyncio.sleep(0.5)
                continue
            items = []
            for msg in msgs:
                if msg.metadata.sequence.consumer != self._outbox_expected:
                    # The server lost the consumer's place: resume after the last one seen.
                    await self._outbox_unsubscribe()
                    break
                self._outbox_expected += 1
                self._outbox_last = msg.metadata.sequence.stream
                encoded = (msg.headers or {}).get(OUTBOX_HEADER)
                if encoded:
                    items.append(OutboxItem(self._outbox_last, base64.b64decode(encoded)))
            after = self._outbox_last
            if items:
                self._outbox_returned = items[-1].position
                return items

    async def outbox_done(self, position: int) -> None:
        """Record the journal position up to which every outbox entry is published.

        The position only moves forward: with several coordinators (each relays the
        whole journal) one that lags behind never moves it back. Compare-and-set; a
        lost race is left to the next call.
        """
        value = str(position).encode()
        try:
            try:
                entry = await self._buckets.outbox.get(_OUTBOX_CURSOR)
            except js_errors.KeyNotFoundError:
                with contextlib.suppress(js_errors.KeyWrongLastSequenceError):
                    await self._buckets.outbox.create(_OUTBOX_CURSOR, value)
                return
            if int((entry.value or b"0").decode()) >= position:
                return
            with contextlib.suppress(js_errors.KeyWrongLastSequenceError):
                await self._buckets.outbox.update(_OUTBOX_CURSOR, value, last=entry.revision)
        except (nats.errors.Error, js_errors.Error, TimeoutError) as exc:
            raise StoreError(f"cannot record the outbox position: {exc}") from exc

    async def _outbox_subscribe(self, after: int) -> None:
        await self._outbox_unsubscribe()
        if after == 0:
            with contextlib.suppress(js_errors.KeyNotFoundError):
                entry = await self._buckets.outbox.get(_OUTBOX_CURSOR)
                after = int((entry.value or b"0").decode())
        name = f"outbox-{uuid.uuid4().hex}"
        await self._js.add_consumer(
            self.stream,
            js_api.ConsumerConfig(
                name=name,
                ack_policy=js_api.AckPolicy.NONE,
                filter_subject=f"{JOURNAL_SUBJECT}.>",
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=after + 1,
                headers_only=True,
                inactive_threshold=60.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        self._outbox_sub = await self._js.pull_subscribe_bind(consumer=name, stream=self.stream)
        self._outbox_consumer = name
        self._outbox_last = after
        self._outbox_expected = 1

    async def _outbox_unsubscribe(self) -> None:
        sub, self._outbox_sub = self._outbox_sub, None
        if sub is None:
            return
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._js.delete_consumer(self.stream, self._outbox_consumer)


def _outbox_header(event: EventRow) -> dict[str, str]:
    return {OUTBOX_HEADER: base64.b64encode(event.outbox).decode()} if event.outbox else {}


async def _nothing() -> None:
    return None


def _key_name(owner: str, key: str) -> str:
    # KV keys allow a narrow alphabet: hash the (owner, key) pair.
    return hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()


_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    js_errors.ServiceUnavailableError,
    js_errors.NoStreamResponseError,
    TimeoutError,
)
"""Errors of a NATS that is reconnecting or electing a stream leader: try again."""


def _owner_token(coordinator: str) -> str:
    return coordinator or "none"


def _active_key(coordinator: str, task_id: str) -> str:
    return f"{_owner_token(coordinator)}.{task_id}"


async def _value(bucket: KeyValue, key: str) -> bytes | None:
    """A key's value in an open bucket, or None when the key is missing or deleted."""
    try:
        entry = await bucket.get(key)
    except js_errors.KeyNotFoundError:
        return None
    return entry.value


async def list_keys(bucket: KeyValue, pattern: str = ">") -> list[str]:
    """The live keys of a bucket matching a subject pattern, as stored when called.

    Not ``KeyValue.keys()`` nor a watch: their "initial values done" marker can come
    before values the server already sent (the watcher compares the consumer's pending
    count with what it has processed, not with what is still in flight: nats.py issue
    #842), so under load they answer with too few keys, or none. An ephemeral pull
    consumer sends nothing until asked, and the reply that creates it counts the
    latest message of each matching key: reading exactly that many lists the bucket.
    """
    # nats-py keeps the bucket's stream, subject prefix and JetStream context private.
    js, stream, prefix = bucket._js, bucket._stream, bucket._pre
    info = await js.add_consumer(
        stream,
        js_api.ConsumerConfig(
            name=f"keys-{uuid.uuid4().hex}",
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=js_api.AckPolicy.NONE,
            filter_subject=f"{prefix}{pattern}",
            headers_only=True,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=_KEYS_INACTIVE,
        ),
    )
    keys: list[str] = []
    remaining = info.num_pending
    try:
        if remaining:
            psub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
            try:
                while remaining > 0:
                    try:
                        msgs = await psub.fetch(min(remaining, _KEYS_BATCH), timeout=5.0)
                    except nats.errors.TimeoutError:
                        # A counted key was removed before it was sent: done if
                        # nothing is left to send.
                        if (await psub.consumer_info()).num_pending == 0:
                            break
                        continue
                    for msg in msgs:
                        remaining -= 1
                        if not _is_removal(msg.headers or {}):
                            keys.append(msg.subject[len(prefix) :])
            finally:
                with contextlib.suppress(nats.errors.Error, TimeoutError, ValueError):
                    await psub.unsubscribe()
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await js.delete_consumer(stream, info.name)
    return keys


def _is_removal(headers: dict[str, str]) -> bool:
    """Whether a KV message marks its key deleted or purged (by a client or by age)."""
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers


def _encode(row: TaskRow) -> bytes:
    fields = asdict(row)
    fields["spec"] = base64.b64encode(row.spec).decode()
    fields["data"] = base64.b64encode(row.data).decode()
    return json.dumps(fields, separators=(",", ":")).encode()


def _decode(value: bytes) -> TaskRow:
    fields = json.loads(value)
    fields["spec"] = base64.b64decode(fields["spec"])
    fields["data"] = base64.b64decode(fields["data"])
    return TaskRow(**fields)


def _with_spec(row: TaskRow, spec: bytes) -> TaskRow:
    fields = asdict(row)
    fields["spec"] = spec
    return TaskRow(**fields)


def _project(value: bytes) -> ProjectRow:
    fields = json.loads(value)
    fields["data"] = base64.b64decode(fields["data"])
    return ProjectRow(**fields)
