"""Webhooks: a task's terminal and input-required events POSTed to HTTP endpoints.

Where they come from: the webhooks of the task's spec (``TaskSpec.webhooks``), those
its owner registered (``RegisterWebhook``) and those registered for its project
(``RegisterWebhook`` with ``project_id``; only the project's owner or an admin may
register, list or delete them). When such an event commits (a
journal listener), one delivery per webhook goes into the durable outbox
(:mod:`.webhook_store`, in the coordinator's database); a background loop sends what is
due. A delivery is a POST of a JSON body with::

    X-Hivewire-Delivery:  <delivery id>           (the same on every retry)
    X-Hivewire-Event:     task.completed
    X-Hivewire-Timestamp: <Unix seconds of this attempt>
    X-Hivewire-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

2xx is delivered; 5xx, 408, 429, timeouts and connection errors are retried with
exponential backoff and full jitter up to ``max_attempts``; any other answer, or the
attempts used up, dead-letters the delivery (``ListWebhookDeliveries`` shows it, with
its last error). Pending deliveries survive a restart: they are in the database.

URLs are checked when given and again before each attempt (a name may resolve
elsewhere later): http or https only, and a host that is or resolves to a private,
loopback, link-local or otherwise non-public address is refused unless
``allow_private`` is on or the host is in ``allowed_hosts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx
from google.protobuf import json_format
from prometheus_client import Counter

from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.base.lifecycle import StartStop, cancel_and_wait
from hivewire.services.coordinator import webhook_store
from hivewire.services.coordinator.journal import TaskRuntime
from hivewire.services.coordinator.model import Caller, TaskRecord, now_ns, state_name
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.coordinator.settings import WebhookSettings
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "Webhooks", "sign"]

SIGNATURE_HEADER = "X-Hivewire-Signature"
TIMESTAMP_HEADER = "X-Hivewire-Timestamp"
DELIVERY_HEADER = "X-Hivewire-Delivery"
EVENT_HEADER = "X-Hivewire-Event"
MIN_SECRET = 16
_MAX_URL = 2048
_BATCH = 32
_RETRY_STATUSES = frozenset({408, 429})

DELIVERIES = Counter(
    "hivewire_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retry, dead_lettered.",
    ("outcome",),
)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Hivewire-Signature`` value: ``sha256=`` + HMAC-SHA256 of ``ts.body``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def _event_type(event: coordinator_pb2.TaskEvent) -> str | None:
    kind = event.WhichOneof("kind")
    if kind == "input_required":
        return "task.input_required"
    if kind == "finished":
        return {
            "succeeded": "task.completed",
            "failed": "task.failed",
            "cancelled": "task.cancelled",
            "dead_lettered": "task.dead_lettered",
        }.get(state_name(event.finished.state))
    return None


class Webhooks(StartStop):
    """Registrations, URL checks and the delivery loop (an async context manager).

    Args:
        settings: Limits, backoff and the private-address policy.
        store: The registrations and the outbox.
        coordinator: Whose task events are delivered.
        transport: An httpx transport (tests); the default opens real connections.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        store: webhook_store.SqliteWebhookStore,
        coordinator: Coordinator,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._coordinator = coordinator
        self._client = httpx.AsyncClient(
            timeout=settings.timeout, follow_redirects=False, transport=transport
        )
        self._allowed = {h.lower().strip("[]") for h in settings.allowed_hosts}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Follow the coordinator's task events and start the delivery loop."""
        self._coordinator.listen(self._on_event)
        self._coordinator.add_spec_check(self.check_spec)
        self._loop_task = asyncio.create_task(self._deliver_forever(), name="webhooks")

    async def stop(self) -> None:
        """Let outbox writes in flight finish (5 s at most), stop delivering, close HTTP."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=5)
        await cancel_and_wait([self._loop_task])
        await self._client.aclose()

    # -- validation ------------------------------------------------------------------

    async def _refusal(self, url: str) -> str | None:
        """Why ``url`` may not receive webhooks, or None when it may."""
        if len(url) > _MAX_URL:
            return f"longer than {_MAX_URL} characters"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return f"not a URL: {exc}"
        if parts.scheme not in ("http", "https"):
            return "the scheme must be http or https"
        host = (parts.hostname or "").lower()
        if not host:
            return "the URL has no host"
        if parts.username or parts.password:
            return "credentials in the URL are not allowed (sign with the secret)"
        if self._settings.allow_private or host in self._allowed:
            return None
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
                )
            except OSError as exc:
                return f"the host does not resolve: {exc}"
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if not address.is_global:
                return (
                    f"{host} is a private, loopback or link-local address ({address}); "
                    "allow it with HIVEWIRE_COORDINATOR__WEBHOOKS__ALLOWED_HOSTS"
                )
        return None

    async def _check(self, webhook: coordinator_pb2.Webhook, field: str) -> list[FieldViolation]:
        violations = []
        refusal = await self._refusal(webhook.url)
        if refusal is not None:
            violations.append(FieldViolation(f"{field}.url", refusal))
        if len(webhook.secret) < MIN_SECRET:
            violations.append(
                FieldViolation(f"{field}.secret", f"at least {MIN_SECRET} characters")
            )
        return violations

    async def check_spec(self, spec: coordinator_pb2.TaskSpec) -> None:
        """Refuse a task spec whose webhooks are invalid (INVALID_ARGUMENT)."""
        if not spec.webhooks:
            return
        violations = []
        if len(spec.webhooks) > self._settings.max_per_task:
            violations.append(
                FieldViolation("spec.webhooks", f"at most {self._settings.max_per_task}")
            )
        for i, webhook in enumerate(spec.webhooks):
            violations += await self._check(webhook, f"spec.webhooks[{i}]")
        if violations:
            raise InvalidArgument(violations=violations, reason="WEBHOOK_INVALID")

    # -- registrations ---------------------------------------------------------------

    async def _project_owner(self, caller: Caller, project_id: str) -> str:
        """The owner of a project the caller may manage webhooks of (its owner, an admin).

        Raises:
            NotFound: No such project, or the caller neither owns it nor is an admin.
        """
        project = await self._coordinator.project_of_owner(project_id, caller)
        return project.owner

    async def register(
        self, caller: Caller, webhook: coordinator_pb2.Webhook | None, *, project_id: str = ""
    ) -> webhook_store.WebhookRow:
        """Register a webhook for every task of the caller, or of ``project_id``.

        Raises:
            InvalidArgument: No webhook, or a bad URL or secret.
            NotFound: The project does not exist or the caller may not manage it.
        """
        if webhook is None:
            raise InvalidArgument(violations=[FieldViolation("webhook", "required")])
        violations = await self._check(webhook, "webhook")
        if violations:
            raise InvalidArgument(violations=violations, reason="WEBHOOK_INVALID")
        owner = await self._project_owner(caller, project_id) if project_id else caller.identity
        row = webhook_store.WebhookRow(
            uuid.uuid4().hex, owner, webhook.url, webhook.secret, now_ns(), project_id
        )
        await self._store.add_webhook(row)
        logger.info(
            "webhook %s registered for %s by %s: %s",
            row.webhook_id,
            f"project {project_id}" if project_id else owner,
            caller.identity,
            row.url,
        )
        return row

    async def registrations(
        self, caller: Caller, *, project_id: str = ""
    ) -> list[webhook_store.WebhookRow]:
        """The caller's registrations, or those of ``project_id``."""
        if project_id:
            await self._project_owner(caller, project_id)
        return await self._store.webhooks_of(caller.identity, project_id=project_id)

    async def unregister(self, caller: Caller, webhook_id: str) -> None:
        """Remove one of the caller's registrations, or of a project the caller manages."""
        if not webhook_id:
            raise InvalidArgument(violations=[FieldViolation("webhook_id", "required")])
        row = await self._store.webhook(webhook_id)
        if (
            row is None
            or not await self._may_manage(caller, row)
            or not await self._store.delete_webhook(webhook_id)
        ):
            raise NotFound("webhook", webhook_id, reason="WEBHOOK_NOT_FOUND")

    async def _may_manage(self, caller: Caller, row: webhook_store.WebhookRow) -> bool:
        if not row.project_id:
            return row.owner == caller.identity
        try:
            await self._project_owner(caller, row.project_id)
        except NotFound:
            return False
        return True

    async def deliveries(
        self, caller: Caller, *, state: int, task_id: str, page_size: int, project_id: str = ""
    ) -> list[webhook_store.DeliveryRow]:
        """Deliveries of the caller's tasks (every task's for an admin), newest first.

        With ``project_id``: the deliveries to that project's webhooks, whoever owns the
        tasks (for the project's owner or an admin).
        """
        size = 50 if page_size <= 0 else min(page_size, 500)
        if project_id:
            await self._project_owner(caller, project_id)
        return await self._store.deliveries(
            owner="" if caller.admin or project_id else caller.identity,
            state=state,
            task_id=task_id,
            limit=size,
            project_id=project_id,
        )

    # -- from events to deliveries ---------------------------------------------------

    def _on_event(self, rt: TaskRuntime, event: coordinator_pb2.TaskEvent) -> None:
        event_type = _event_type(event)
        if event_type is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._enqueue(rt.record, event, event_type), name="webhook-enqueue"
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _enqueue(
        self, record: TaskRecord, event: coordinator_pb2.TaskEvent, event_type: str
    ) -> None:
        try:
            targets = [("", "", w.url, w.secret) for w in record.spec.webhooks]
            registered = await self._store.webhooks_of(record.owner)
            if record.project_id:
                registered += await self._store.webhooks_of("", project_id=record.project_id)
            targets += [(r.webhook_id, r.project_id, r.url, r.secret) for r in registered]
            if not targets:
                return
            body = json.dumps(
                {
                    "type": event_type,
                    "task": {
                        "task_id": record.task_id,
                        "state": state_name(record.state),
                        "capability": record.capability,
                        "owner": record.owner,
                        "attempt": record.attempt,
                        "project_id": record.project_id,
                    },
                    "event": json_format.MessageToDict(event, preserving_proto_field_name=True),
                },
                separators=(",", ":"),
                sort_keys=True,
            ).encode()
            stamp = now_ns()
            rows = []
            for webhook_id, project_id, url, secret in targets:
                key = f"{record.task_id}:{event.sequence}:{webhook_id}:{url}"
                rows.append(
                    webhook_store.DeliveryRow(
                        delivery_id=hashlib.sha256(key.encode()).hexdigest()[:32],
                        webhook_id=webhook_id,
                        owner=record.owner,
                        task_id=record.task_id,
                        sequence=event.sequence,
                        event_type=event_type,
                        url=url,
                        secret=secret,
                        body=body,
                        state=webhook_store.PENDING,
                        attempts=0,
                        last_error="",
                        created_ns=stamp,
                        next_at_ns=stamp,
                        project_id=project_id,
                    )
                )
            await self._store.add_deliveries(rows)
            self._wake.set()
        except Exception:
            logger.exception("queueing webhooks of task %s failed", record.task_id)

    # -- delivery --------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while True:
            try:
                due = await self._store.due(now_ns(), _BATCH)
                if due:
                    await asyncio.gather(*(self._attempt(row) for row in due))
                    continue
                next_ns = await self._store.next_due_ns()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("webhook delivery loop failed; going on")
                next_ns = now_ns() + 1_000_000_000
            wait = None if next_ns is None else max((next_ns - now_ns()) / 1e9, 0.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _attempt(self, row: webhook_store.DeliveryRow) -> None:
        attempts = row.attempts + 1
        error, retry = await self._post(row)
        if error is None:
            state, next_at = webhook_store.DELIVERED, 0
            DELIVERIES.labels("delivered").inc()
            logger.info("webhook %s delivered to %s", row.event_type, row.url)
        elif retry and attempts < self._settings.max_attempts:
            bound = min(
                self._settings.max_backoff,
                self._settings.initial_backoff * 2 ** (attempts - 1),
            )
            state = webhook_store.PENDING
            next_at = now_ns() + int(random.uniform(bound / 2, bound) * 1e9)
            DELIVERIES.labels("retry").inc()
            logger.info(
                "webhook %s to %s failed (attempt %d): %s", row.event_type, row.url, attempts, error
            )
        else:
            state, next_at = webhook_store.DEAD, 0
            DELIVERIES.labels("dead_lettered").inc()
            logger.warning(
                "webhook %s to %s dead-lettered after %d attempt(s): %s",
                row.event_type,
                row.url,
                attempts,
                error,
            )
        await self._store.record_attempt(
            row.delivery_id,
            state=state,
            attempts=attempts,
            last_error=error or "",
            next_at_ns=next_at,
        )

    async def _post(self, row: webhook_store.DeliveryRow) -> tuple[str | None, bool]:
        """POST once; returns (error or None, whether a retry may help)."""
        refusal = await self._refusal(row.url)
        if refusal is not None:
            return f"refused: {refusal}", False
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: row.delivery_id,
            EVENT_HEADER: row.event_type,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(row.secret, timestamp, row.body),
        }
        try:
            response = await self._client.post(row.url, content=row.body, headers=headers)
        except httpx.TimeoutException:
            return f"no answer within {self._settings.timeout:g}s", True
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", True
        if 200 <= response.status_code < 300:
            return None, False
        error = f"HTTP {response.status_code}"
        return error, response.status_code >= 500 or response.status_code in _RETRY_STATUSES
