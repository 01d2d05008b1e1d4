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

Not built yet: listing and recovery scan the task bucket (O(tasks)); several
coordinators sharing this store through leases and a work queue is the next step
(README "Not built yet").
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import nats
import nats.errors
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

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
)

logger = logging.getLogger(__name__)

__all__ = ["JetStreamTaskStore"]

T = TypeVar("T")

JOURNAL_SUBJECT = "hivewire.journal"
SEQUENCE_HEADER = "Hivewire-Sequence"
OUTBOX_HEADER = "Hivewire-Outbox"
"""Header of a journal message carrying the event's outbox entry (base64)."""
_OUTBOX_CURSOR = "relay"
_OUTBOX_FETCH_WAIT = 5.0
_INDEX_CACHE = 4096
"""Tasks whose journal index (task sequence -> stream sequence) stays in memory."""


@dataclass
class _Item:
    run: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


class JetStreamTaskStore:
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
        self._tasks: KeyValue | None = None
        self._keys: KeyValue | None = None
        self._projects: KeyValue | None = None
        self._tombstones: KeyValue | None = None
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        # Revision and spec of each unfinished task this store wrote or read: forgotten
        # when the task is written finished (it is read back from the bucket if needed).
        self._revisions: dict[str, int] = {}
        self._specs: dict[str, bytes] = {}
        self._index: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._closed = False
        self._outbox: KeyValue | None = None
        self._outbox_sub: Any = None
        self._outbox_consumer = ""
        self._outbox_last = -1  # the last journal message the consumer delivered
        self._outbox_returned = -1  # the position of the last item returned
        self._outbox_expected = 1  # the consumer sequence of the next message

    @property
    def stream(self) -> str:
        """The journal stream's name."""
        return f"{self._prefix}_JOURNAL"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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
            self._tasks = await self._bucket("TASKS")
            self._keys = await self._bucket("IDEMPOTENCY")
            self._projects = await self._bucket("PROJECTS")
            self._tombstones = await self._bucket("PURGED")
            self._outbox = await self._bucket("OUTBOX")
            await self._js.add_stream(
                js_api.StreamConfig(
                    name=self.stream,
                    subjects=[f"{JOURNAL_SUBJECT}.>"],
                    num_replicas=self._replicas,
                    duplicate_window=120,
                )
            )
        except Exception as exc:
            await self._disconnect()
            raise StoreError(f"cannot open the JetStream task store: {exc}") from exc
        self._worker = asyncio.create_task(self._work(), name="coordinator-jetstream-store")
        logger.info(
            "JetStream task store open (prefix %s, replicas %d)", self._prefix, self._replicas
        )

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
                _settle(item.future, None, exc)
            except Exception as exc:
                logger.exception("JetStream task store operation failed")
                _settle(item.future, None, StoreError(str(exc)))
            else:
                _settle(item.future, result, None)

    # -- writes ----------------------------------------------------------------------

    def put(
        self, *, tasks: Sequence[TaskRow] = (), events: Sequence[EventRow] = ()
    ) -> asyncio.Future[None]:
        """Queue task upserts and event appends; the future resolves once stored."""
        future: asyncio.Future[None] = self._submit(lambda: self._write(tasks, events))
        future.add_done_callback(_consume_exception)
        return future

    async def flush(self) -> None:
        """Wait until every write queued so far is stored."""
        await self._submit(_nothing)

    async def _write(self, tasks: Sequence[TaskRow], events: Sequence[EventRow]) -> None:
        assert self._tasks is not None and self._keys is not None
        latest: dict[str, TaskRow] = {}
        for task in tasks:
            latest[task.task_id] = task
        # Idempotency keys first: a task whose key belongs to another task is not stored.
        for task in latest.values():
            if task.idempotency_key and task.task_id not in self._revisions:
                await self._claim_key(task)
        for event in events:
            ack = await self._js.publish(
                f"{JOURNAL_SUBJECT}.{event.task_id}",
                event.data,
                headers={
                    "Nats-Msg-Id": f"{event.task_id}:{event.sequence}",
                    SEQUENCE_HEADER: str(event.sequence),
                    **_outbox_header(event),
                },
            )
            index = self._index.get(event.task_id)
            if index is not None:
                index[event.sequence] = ack.seq
        for task in latest.values():
            await self._put_row(task)

    async def _claim_key(self, task: TaskRow) -> None:
        assert self._keys is not None
        key = _key_name(task.owner, task.idempotency_key)
        try:
            await self._keys.create(key, task.task_id.encode())
        except js_errors.KeyWrongLastSequenceError:
            holder = await self._keys.get(key)
            if holder.value is None or holder.value.decode() != task.task_id:
                raise StoreError(
                    f"idempotency key {task.idempotency_key!r} of {task.owner} belongs to "
                    f"another task"
                ) from None

    async def _put_row(self, task: TaskRow) -> None:
        assert self._tasks is not None
        revision = self._revisions.get(task.task_id)
        if revision is None:
            try:
                self._revisions[task.task_id] = await self._tasks.create(
                    task.task_id, _encode(task)
                )
                self._specs[task.task_id] = task.spec
                self._forget_if_finished(task)
                return
            except js_errors.KeyWrongLastSequenceError:
                # Written before (by this process before a restart, or another one).
                entry = await self._tasks.get(task.task_id)
                if entry.value is None or entry.revision is None:
                    raise StoreError(f"task {task.task_id} vanished while written") from None
                revision = entry.revision
                # The spec is written once, never replaced.
                task = _with_spec(task, _decode(entry.value).spec)
        else:
            cached = self._specs.get(task.task_id)
            if cached is not None:
                task = _with_spec(task, cached)
        try:
            self._revisions[task.task_id] = await self._tasks.update(
                task.task_id, _encode(task), last=revision
            )
        except js_errors.KeyWrongLastSequenceError as exc:
            self._revisions.pop(task.task_id, None)
            raise StoreError(
                f"task {task.task_id} was changed by another writer (revision {revision})"
            ) from exc
        self._forget_if_finished(task)

    def _forget_if_finished(self, task: TaskRow) -> None:
        if task.state in TERMINAL_STATES:
            self._revisions.pop(task.task_id, None)
            self._specs.pop(task.task_id, None)

    # -- reads -----------------------------------------------------------------------

    async def _get_row(self, task_id: str) -> TaskRow | None:
        assert self._tasks is not None
        try:
            entry = await self._tasks.get(task_id)
        except js_errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        row = _decode(entry.value)
        if entry.revision is not None and row.state not in TERMINAL_STATES:
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
            assert self._keys is not None
            try:
                entry = await self._keys.get(_key_name(owner, key))
            except js_errors.KeyNotFoundError:
                return None
            if entry.value is None:
                return None
            return await self._get_row(entry.value.decode())

        result: TaskRow | None = await self._submit(run)
        return result

    async def _all_rows(self) -> list[TaskRow]:
        assert self._tasks is not None
        try:
            keys = await self._tasks.keys()
        except js_errors.NoKeysError:
            return []
        rows = []
        for key in keys:
            row = await self._get_row(key)
            if row is not None:
                rows.append(row)
        return rows

    async def active_tasks(self) -> list[TaskRow]:
        """Every task not in a terminal state, oldest first."""

        async def run() -> list[TaskRow]:
            rows = [r for r in await self._all_rows() if r.state not in TERMINAL_STATES]
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
        """Task sequence -> stream sequence of a task's events (cached, built once)."""
        index = self._index.get(task_id)
        if index is not None:
            self._index.move_to_end(task_id)
            return index
        index = {}
        subject = f"{JOURNAL_SUBJECT}.{task_id}"
        seq = 1
        while True:
            try:
                msg = await self._js.get_msg(self.stream, seq=seq, subject=subject, next=True)
            except js_errors.NotFoundError:
                break
            headers = msg.headers or {}
            index[int(headers.get(SEQUENCE_HEADER, "0"))] = msg.seq
            seq = msg.seq + 1
        self._index[task_id] = index
        while len(self._index) > _INDEX_CACHE:
            self._index.popitem(last=False)
        return index

    async def events_after(
        self, task_id: str, after: int, *, until: int | None = None, limit: int = 1000
    ) -> list[EventRow]:
        """A task's events with ``after < sequence <= until``, in order."""

        async def run() -> list[EventRow]:
            index = await self._journal_index(task_id)
            wanted = sorted(n for n in index if n > after and (until is None or n <= until))
            rows = []
            for n in wanted[: max(limit, 0)]:
                msg = await self._js.get_msg(self.stream, seq=index[n])
                rows.append(EventRow(task_id, n, bytes(msg.data or b"")))
            return rows

        result: list[EventRow] = await self._submit(run)
        return result

    async def last_sequence(self, task_id: str) -> int:
        """The sequence of a task's latest stored event (0 when none)."""

        async def run() -> int:
            index = await self._journal_index(task_id)
            return max(index, default=0)

        result: int = await self._submit(run)
        return result

    async def count_tasks(self) -> int:
        """How many tasks are stored."""

        async def run() -> int:
            assert self._tasks is not None
            try:
                return len(await self._tasks.keys())
            except js_errors.NoKeysError:
                return 0

        result: int = await self._submit(run)
        return result

    # -- projects --------------------------------------------------------------------

    async def put_project(self, project: ProjectRow) -> None:
        """Store a new project."""

        async def run() -> None:
            assert self._projects is not None
            value = json.dumps(
                {**asdict(project), "data": base64.b64encode(project.data).decode()}
            ).encode()
            try:
                await self._projects.create(project.project_id, value)
            except js_errors.KeyWrongLastSequenceError as exc:
                raise StoreError(f"project {project.project_id} exists") from exc

        await self._submit(run)

    async def _projects_all(self) -> list[ProjectRow]:
        assert self._projects is not None
        try:
            keys = await self._projects.keys()
        except js_errors.NoKeysError:
            return []
        rows = []
        for key in keys:
            entry = await self._projects.get(key)
            if entry.value is not None:
                rows.append(_project(entry.value))
        return rows

    async def get_project(self, project_id: str) -> ProjectRow | None:
        """A project's row, or None."""

        async def run() -> ProjectRow | None:
            assert self._projects is not None
            try:
                entry = await self._projects.get(project_id)
            except js_errors.KeyNotFoundError:
                return None
            return _project(entry.value) if entry.value is not None else None

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
            assert self._keys is not None
            name = _key_name(owner, key)
            try:
                entry = await self._keys.get(name)
            except js_errors.KeyNotFoundError:
                return
            if entry.value is not None and entry.value.decode() == task_id:
                await self._keys.delete(name, last=entry.revision)
            row = await self._get_row(task_id)
            if row is not None and row.idempotency_key == key:
                fields = asdict(row)
                fields["idempotency_key"] = ""
                stored = await self._tasks.get(task_id)  # type: ignore[union-attr]
                await self._tasks.update(  # type: ignore[union-attr]
                    task_id, _encode(TaskRow(**fields)), last=stored.revision
                )

        await self._submit(run)

    async def purge_finished(self, before_ns: int, *, limit: int, now: int) -> int:
        """Delete up to ``limit`` tasks finished before ``before_ns`` with their journals.

        Each leaves a tombstone stamped ``now``. Runs in the store's queue, between
        other operations, a task at a time (there is no multi-key transaction).
        """

        async def run() -> int:
            assert self._tasks is not None and self._tombstones is not None
            victims = sorted(
                (
                    r
                    for r in await self._all_rows()
                    if r.state in TERMINAL_STATES and r.updated_ns < before_ns
                ),
                key=lambda r: r.updated_ns,
            )[: max(limit, 0)]
            for row in victims:
                await self._tombstones.put(
                    row.task_id,
                    json.dumps({"owner": row.owner, "purged_ns": now}).encode(),
                )
                await self._js.purge_stream(self.stream, subject=f"{JOURNAL_SUBJECT}.{row.task_id}")
                if row.idempotency_key:
                    with contextlib.suppress(js_errors.KeyNotFoundError):
                        name = _key_name(row.owner, row.idempotency_key)
                        entry = await self._keys.get(name) if self._keys else None
                        if entry is not None and entry.value == row.task_id.encode():
                            await self._keys.delete(name)  # type: ignore[union-attr]
                await self._tasks.purge(row.task_id)
                self._index.pop(row.task_id, None)
                self._revisions.pop(row.task_id, None)
                self._specs.pop(row.task_id, None)
            return len(victims)

        result: int = await self._submit(run)
        return result

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]:
        """Delete finished tasks and their journals; returns the ids deleted."""

        async def run() -> list[str]:
            assert self._tasks is not None
            deleted = []
            for task_id in dict.fromkeys(task_ids):
                row = await self._get_row(task_id)
                if row is None or row.state not in TERMINAL_STATES:
                    continue
                await self._js.purge_stream(self.stream, subject=f"{JOURNAL_SUBJECT}.{task_id}")
                await self._tasks.purge(task_id)
                self._index.pop(task_id, None)
                deleted.append(task_id)
            return deleted

        result: list[str] = await self._submit(run)
        return result

    async def prune_tombstones(self, before_ns: int, *, limit: int) -> int:
        """Delete up to ``limit`` tombstones made before ``before_ns``; how many."""

        async def run() -> int:
            assert self._tombstones is not None
            try:
                keys = await self._tombstones.keys()
            except js_errors.NoKeysError:
                return 0
            old = []
            for key in keys:
                entry = await self._tombstones.get(key)
                if entry.value is not None:
                    purged = int(json.loads(entry.value)["purged_ns"])
                    if purged < before_ns:
                        old.append((purged, key))
            old.sort()
            for _, key in old[: max(limit, 0)]:
                await self._tombstones.purge(key)
            return min(len(old), max(limit, 0))

        result: int = await self._submit(run)
        return result

    async def tombstone(self, task_id: str) -> Tombstone | None:
        """The tombstone of a purged task, or None."""

        async def run() -> Tombstone | None:
            assert self._tombstones is not None
            try:
                entry = await self._tombstones.get(task_id)
            except js_errors.KeyNotFoundError:
                return None
            if entry.value is None:
                return None
            fields = json.loads(entry.value)
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
        assert self._outbox is not None
        value = str(position).encode()
        try:
            try:
                entry = await self._outbox.get(_OUTBOX_CURSOR)
            except js_errors.KeyNotFoundError:
                with contextlib.suppress(js_errors.KeyWrongLastSequenceError):
                    await self._outbox.create(_OUTBOX_CURSOR, value)
                return
            if int((entry.value or b"0").decode()) >= position:
                return
            with contextlib.suppress(js_errors.KeyWrongLastSequenceError):
                await self._outbox.update(_OUTBOX_CURSOR, value, last=entry.revision)
        except (nats.errors.Error, js_errors.Error, TimeoutError) as exc:
            raise StoreError(f"cannot record the outbox position: {exc}") from exc

    async def _outbox_subscribe(self, after: int) -> None:
        await self._outbox_unsubscribe()
        if after == 0:
            assert self._outbox is not None
            with contextlib.suppress(js_errors.KeyNotFoundError):
                entry = await self._outbox.get(_OUTBOX_CURSOR)
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


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
