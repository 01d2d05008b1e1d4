"""Wiring of a coordinator process: store, registry, agent pool, domain, gRPC server.

Like every service process, the coordinator runs inside
:func:`~hivewire.services.runtime.bootstrap.service_process` (instance id, event
publisher, registry, serving): :func:`start_coordinator` opens its parts on that
process. ``python -m hivewire.services.coordinator`` runs it until a signal;
:func:`running_coordinator` is the same for tests, in-process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hivewire.discovery import Instance, Registry
from hivewire.services.coordinator import metrics
from hivewire.services.coordinator.cluster import Cluster, ClusterOptions
from hivewire.services.coordinator.deadletters import DeadLetters
from hivewire.services.coordinator.dispatch import AgentPool
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.coordinator.journal import CoordinatorEvents
from hivewire.services.coordinator.outbox import OutboxRelay, outbox_sink
from hivewire.services.coordinator.retention import Retention
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.coordinator.servicer import (
    ID_IN_RESPONSE_METHODS,
    SERVICE_NAME,
    UNTRACED_METHODS,
    CoordinatorServicer,
    add_to_server,
)
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import TaskStore
from hivewire.services.coordinator.webhook_store import SqliteWebhookStore
from hivewire.services.coordinator.webhooks import Webhooks
from hivewire.services.runtime.bootstrap import Registration, ServiceProcess, service_process
from hivewire.services.runtime.channels import ChannelPool
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.tls import nats_tls_options

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY_SERVICE",
    "RunningCoordinator",
    "freeze_start_up_heap",
    "running_coordinator",
    "start_coordinator",
]

REGISTRY_SERVICE = "hivewire-coordinator"
"""Registry name of coordinators."""


@dataclass
class RunningCoordinator:
    """A started coordinator.

    Attributes:
        settings: The effective settings.
        coordinator: The domain service.
        server: The gRPC server.
        pool: The agent pool.
        store: The task store.
        instance: Its registry entry, when registered.
        retention: The background purge of finished tasks.
    """

    settings: CoordinatorProcessSettings
    coordinator: Coordinator
    server: ServiceServer
    pool: AgentPool
    store: TaskStore
    instance: Instance | None = None
    retention: Retention | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server."""
        return self.server.address


@contextlib.asynccontextmanager
async def running_coordinator(
    settings: CoordinatorProcessSettings,
    *,
    registry: Registry | None = None,
    events: CoordinatorEvents | None = None,
    register: bool = True,
) -> AsyncIterator[RunningCoordinator]:
    """Start a coordinator and stop it (gracefully) when the block ends.

    Args:
        settings: Process settings; ``settings.coordinator`` tunes the coordinator.
        registry: A started registry to use; by default one is opened from
            ``settings.discovery`` (and closed at the end).
        events: Where task events go; by default an ``EventPublisher`` on
            ``settings.nats_url`` (off when ``settings.events.enabled`` is false).
        register: Register as ``hivewire-coordinator`` in the registry.

    Yields:
        The running coordinator.
    """
    async with service_process(
        settings, "coordinator", events=events, registry=registry
    ) as process:
        yield await start_coordinator(process, settings, register=register)


async def start_coordinator(
    process: ServiceProcess, settings: CoordinatorProcessSettings, *, register: bool = True
) -> RunningCoordinator:
    """Open the coordinator's parts on the process's stack and start serving.

    Everything it opens closes with ``process.stack``, the server first.

    Args:
        process: The coordinator process (:func:`service_process`).
        settings: Its settings (``process.settings``, typed).
        register: Register as ``hivewire-coordinator`` in the registry.
    """
    cfg = settings.coordinator
    stack = process.stack
    events: CoordinatorEvents = process.events
    store: TaskStore
    cluster: Cluster | None = None
    if cfg.store == "jetstream":
        shared = await stack.enter_async_context(
            JetStreamTaskStore(
                [url.strip() for url in settings.nats_url.split(",") if url.strip()],
                prefix=cfg.jetstream_prefix,
                replicas=cfg.jetstream_replicas,
                connect=nats_tls_options(settings.nats_url, settings.tls_files()),
            )
        )
        store = shared
        # Any number of coordinators share the store: leases (cluster.py).
        options = ClusterOptions(
            lease_ttl=cfg.lease_ttl,
            heartbeat=cfg.lease_heartbeat,
            request_timeout=cfg.forward_timeout,
        )
        cluster = Cluster(shared, process.instance_id, options=options)
    else:
        store = await stack.enter_async_context(
            SqliteTaskStore(cfg.db_path, batch_max=cfg.write_batch_max)
        )
    sink = outbox_sink(events)
    if sink is not None:
        # Task events go out through the store's outbox: what an earlier process
        # committed and did not publish goes first (docs/events.md, "The outbox").
        await stack.enter_async_context(OutboxRelay(store, sink, hold=cfg.outbox_hold))
    registry = await process.registry()
    channels = await stack.enter_async_context(ChannelPool.from_settings(settings))
    wake: list[Coordinator] = []
    pool = AgentPool(
        registry,
        channels,
        service=cfg.agent_service,
        default_concurrency=cfg.default_agent_concurrency,
        breaker=cfg.breaker,
        describe_timeout=cfg.describe_timeout,
        on_change=lambda: wake[0].wake() if wake else None,
        events=events,
    )
    coordinator = Coordinator(
        cfg,
        store=store,
        pool=pool,
        events=events,
        approvals=ApprovalSigner(settings.tls_files(), ttl=cfg.approval_ttl),
        cluster=cluster,
    )
    coordinator.listen(metrics.task_event_committed)
    wake.append(coordinator)
    # Before the coordinator starts: events of recovered tasks reach webhooks too.
    webhook_store = await stack.enter_async_context(SqliteWebhookStore(cfg.db_path))
    webhooks = await stack.enter_async_context(Webhooks(cfg.webhooks, webhook_store, coordinator))
    await stack.enter_async_context(coordinator)
    await stack.enter_async_context(pool)
    retention = await stack.enter_async_context(Retention(store, cfg))
    servicer = CoordinatorServicer(coordinator, DeadLetters(coordinator, store, events), webhooks)
    registration = Registration(
        REGISTRY_SERVICE,
        process.instance_id,
        meta={"name": "coordinator", "identity": settings.identity},
    )
    started = await process.start(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda s: add_to_server(servicer, s),
                untraced_methods=UNTRACED_METHODS,
                id_in_response_methods=ID_IN_RESPONSE_METHODS,
            )
        ],
        registration if register else None,
        on_shutdown=[coordinator.drain],
    )
    return RunningCoordinator(
        settings, coordinator, started.server, pool, store, started.instance, retention
    )


def freeze_start_up_heap() -> int:
    """Take what start-up made out of the garbage collector's view (``gc.freeze()``).

    Called once the coordinator serves: modules, settings, the server, and every task
    recovered from the store. A full collection walks every tracked object; with
    100,000 waiting tasks recovered that is about 1.5 million objects (1.3 s with the
    event loop stopped, measured), in every full collection. Frozen objects are still
    freed when nothing refers to them; only a reference cycle among them would outlive
    its use (bounded by what existed at start-up). Garbage is collected first, so none
    is frozen.

    Returns:
        How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
