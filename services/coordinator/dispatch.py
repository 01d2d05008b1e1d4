"""The agent pool: who can run what, how busy they are, and which one gets a task.

:class:`AgentPool` follows ``hivewire-agent`` in the registry (the ``Registry``
protocol only, so the backend is a configuration choice). An instance that leaves
the healthy set is dropped from selection at once; one that still runs tasks for
us stays listed as draining until they end.

Selection (:meth:`AgentPool.acquire`): among healthy agents that advertise the
capability, have a free slot (``in_flight < max_concurrency``) and whose circuit
breaker admits a call, pick two at random and take the less loaded one (power of
two choices: close to least-loaded without every coordinator piling onto the same
agent). Agents a task already failed on are avoided while others fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.discovery import Instance, Registry, instance_name
from hivewire.events.v1 import events_pb2
from hivewire.services.base.lifecycle import StartStop, cancel_and_wait
from hivewire.services.coordinator import metrics
from hivewire.services.coordinator.model import AgentView, now_ns
from hivewire.services.runtime import tracing
from hivewire.services.runtime.breaker import (
    BreakerOptions,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from hivewire.services.runtime.channels import ChannelPool
from hivewire.services.runtime.errors import HivewireError
from hivewire.services.runtime.eventsink import EventSink, NullSink
from hivewire.services.runtime.interceptors import observe_client_call
from hivewire.services.runtime.status import from_rpc_error

logger = logging.getLogger(__name__)

__all__ = [
    "AgentEntry",
    "AgentLease",
    "AgentPool",
    "AttemptError",
    "Closable",
    "ExecuteStream",
    "Verdict",
    "classify_rpc_error",
    "classify_status",
]

META_NAME = "name"
META_VERSION = "version"
META_MAX_CONCURRENCY = "max_concurrency"
META_TLS_SERVER_NAME = "tls_server_name"
EXECUTE_METHOD = f"/{agent_pb2.DESCRIPTOR.services_by_name['AgentService'].full_name}/Execute"
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError)
"""What a write on a stream to an agent raises once the call is over (the read side says why)."""


class Closable(Protocol):
    """What the pool keeps per agent besides its state: its ``Link`` (link.py)."""

    def close(self) -> None:
        """End it (the agent left the pool, or the pool stops)."""


@dataclass
class AgentEntry:
    """The pool's state of one agent instance."""

    instance: Instance
    max_concurrency: int
    breaker: CircuitBreaker
    in_flight: int = 0
    present: bool = True
    probing: bool = False
    link: Closable | None = None
    """The open ``Link`` stream to the agent, opened by the first attempt (link.py)."""
    link_unsupported: bool = False
    """The agent refused ``Link`` (UNIMPLEMENTED...): it gets an Execute call per attempt."""
    last_seen_ns: int = field(default_factory=now_ns)
    card: agent_pb2.AgentCard | None = None
    # The Execute stub on the agent's channel (a stub is one object per method of the
    # service): made again only when the pool hands out another channel.
    _stub: tuple[grpc.aio.Channel, agent_pb2_grpc.AgentServiceAsyncStub] | None = field(
        default=None, repr=False
    )

    def stub_on(self, channel: grpc.aio.Channel) -> agent_pb2_grpc.AgentServiceAsyncStub:
        """The agent's stub on ``channel`` (kept while the channel stays the same)."""
        if self._stub is None or self._stub[0] is not channel:
            stub: agent_pb2_grpc.AgentServiceAsyncStub = agent_pb2_grpc.AgentServiceStub(channel)
            self._stub = (channel, stub)
        return self._stub[1]

    @property
    def agent_id(self) -> str:
        """The instance id."""
        return self.instance.instance_id

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capability names (the registry tags)."""
        return self.instance.tags

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.instance.meta.get(META_NAME) or instance_name(self.instance)

    def admits(self) -> bool:
        """Whether the breaker lets a new call through now."""
        state = self.breaker.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and not self.probing
        )

    def can_take(self, capability: str) -> bool:
        """Whether this agent may get a task of ``capability`` now."""
        return (
            self.present
            and self.in_flight < self.max_concurrency
            and capability in self.instance.tags
            and self.admits()
        )

    def close_link(self) -> None:
        """End the agent's ``Link`` if one is open."""
        link, self.link = self.link, None
        if link is not None:
            link.close()


Verdict = str
"""How an attempt ended for the agent's breaker: ``"success"``, ``"failure"`` or ``"none"``."""


@dataclass
class AgentLease:
    """One slot on one agent, held for the duration of an attempt."""

    entry: AgentEntry
    stub: agent_pb2_grpc.AgentServiceAsyncStub
    probe: bool
    released: bool = False

    @property
    def agent_id(self) -> str:
        """The agent's instance id."""
        return self.entry.agent_id


_AGENT_BREAKER = BreakerOptions(failure_threshold=5, reset_timeout=10.0)
"""An agent's circuit when none is given."""


class AgentPool(StartStop):
    """Agents from discovery, their load and health (an async context manager).

    Args:
        registry: Where agents register.
        channels: Long-lived channels to agents (one per agent address).
        service: Registry name of agents.
        default_concurrency: Concurrency of an agent that advertises none.
        breaker: Each agent's circuit: opened by consecutive transport failures.
        describe_timeout: Deadline of the ``Describe`` call made when an agent appears.
        on_change: Called (synchronously) when agents appear or slots free up.
        events: Where ``agent.health_changed`` is published: when an agent leaves or
            rejoins discovery's healthy set, and when its circuit breaker changes state.
    """

    def __init__(
        self,
        registry: Registry,
        channels: ChannelPool,
        *,
        service: str = "hivewire-agent",
        default_concurrency: int = 4,
        breaker: BreakerOptions = _AGENT_BREAKER,
        describe_timeout: float = 3.0,
        on_change: Callable[[], None] | None = None,
        events: EventSink[events_pb2.AgentEventData] | None = None,
    ) -> None:
        self._registry = registry
        self._events: EventSink[events_pb2.AgentEventData] = events or NullSink()
        self._channels = channels
        self._service = service
        self._default_concurrency = default_concurrency
        self._breaker = breaker
        self._describe_timeout = describe_timeout
        self._on_change = on_change or (lambda: None)
        self._agents: dict[str, AgentEntry] = {}
        self._capabilities_seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._first_view = asyncio.Event()
        self._stopped = False

    async def start(self) -> None:
        """Start following the registry."""
        self._watch_task = asyncio.create_task(self._watch(), name="agent-pool-watch")

    async def stop(self) -> None:
        """Stop following the registry and background Describe calls."""
        self._stopped = True
        for entry in self._agents.values():
            entry.close_link()
        await cancel_and_wait((self._watch_task, *self._tasks), suppress=(Exception,))
        self._tasks.clear()

    async def wait_ready(self) -> None:
        """Wait until the first registry view arrived (bound it with ``asyncio.timeout``)."""
        await self._first_view.wait()

    # -- registry --------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                async for healthy in self._registry.watch(self._service):
                    self.apply(healthy)
                logger.warning("agent watch ended (registry closed?); watching again")
            except asyncio.CancelledError:
                raise
            except Exception:
                # The protocol promises a watch that does not raise; be robust anyway.
                logger.exception("agent watch failed; watching again")
            # Pace the restarts: a registry that keeps failing must not spin the loop.
            await asyncio.sleep(1.0)

    def apply(self, healthy: Collection[Instance]) -> None:
        """Take a new healthy set of agents from discovery."""
        seen: set[str] = set()
        stamp = now_ns()
        changed = False
        for instance in healthy:
            seen.add(instance.instance_id)
            entry = self._agents.get(instance.instance_id)
            if entry is None:
                entry = AgentEntry(
                    instance=instance,
                    max_concurrency=self._concurrency_of(instance),
                    breaker=CircuitBreaker(
                        f"agent:{instance.instance_id}",
                        failure_threshold=self._breaker.failure_threshold,
                        reset_timeout=self._breaker.reset_timeout,
                        on_state_change=self._breaker_changed,
                    ),
                )
                self._agents[instance.instance_id] = entry
                logger.info(
                    "agent %s (%s) at %s joined: %s, max concurrency %d",
                    entry.agent_id,
                    entry.name,
                    instance.endpoint,
                    ",".join(instance.tags) or "no capabilities",
                    entry.max_concurrency,
                )
                self._spawn(self._describe(entry))
                changed = True
            else:
                if not entry.present:
                    logger.info("agent %s is back", entry.agent_id)
                    changed = True
                    entry.present = True
                    self._health_changed(entry, "healthy in discovery again")
                if entry.instance != instance:
                    entry.instance = instance
                    entry.max_concurrency = self._concurrency_of(instance, entry.card)
                    changed = True
                entry.present = True
            entry.last_seen_ns = stamp
        for agent_id, entry in list(self._agents.items()):
            if agent_id in seen or not entry.present:
                continue
            entry.present = False
            logger.info("agent %s left (or is unhealthy): no new tasks go to it", agent_id)
            self._health_changed(entry, "left discovery's healthy set")
            self._forget_if_idle(entry)
        self._first_view.set()
        self._update_metrics()
        if changed:
            self._on_change()

    def _breaker_changed(self, name: str, state: CircuitState) -> None:
        metrics.circuit_state_changed(name, state)
        entry = next((a for a in self._agents.values() if a.breaker.name == name), None)
        # None: the breaker reporting its first state, before the agent is listed.
        if entry is not None:
            self._health_changed(entry, f"circuit {state.name.lower()}", state)

    def _health_changed(
        self, entry: AgentEntry, reason: str, state: CircuitState | None = None
    ) -> None:
        """Publish ``agent.health_changed`` with the agent's health after the change."""
        circuit = state or entry.breaker.state
        self._events.publish(
            "agent.health_changed",
            subject=entry.agent_id,
            data=events_pb2.AgentEventData(
                agent_id=entry.agent_id,
                name=entry.name,
                address=entry.instance.endpoint,
                capabilities=entry.capabilities,
                healthy=entry.present and circuit is not CircuitState.OPEN,
                reason=reason,
                version=entry.instance.meta.get(META_VERSION, ""),
                circuit_state=circuit.name.lower(),
            ),
        )

    def _concurrency_of(self, instance: Instance, card: agent_pb2.AgentCard | None = None) -> int:
        raw = instance.meta.get(META_MAX_CONCURRENCY, "")
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0 and card is not None:
            value = card.max_concurrency
        return value if value > 0 else self._default_concurrency

    def _forget_if_idle(self, entry: AgentEntry) -> None:
        if entry.present or entry.in_flight > 0:
            return
        self._agents.pop(entry.agent_id, None)
        entry.close_link()
        metrics.forget_circuit(entry.breaker.name)
        endpoint = entry.instance.endpoint
        if self._stopped:
            return  # the channel pool closes every channel itself
        if not any(a.instance.endpoint == endpoint for a in self._agents.values()):
            self._spawn(self._channels.discard(endpoint))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _channel(self, entry: AgentEntry, *, intercepted: bool = True) -> grpc.aio.Channel:
        server_name = entry.instance.meta.get(META_TLS_SERVER_NAME) or None
        return self._channels.get(
            entry.instance.endpoint, server_name=server_name, intercepted=intercepted
        )

    async def _describe(self, entry: AgentEntry) -> None:
        stub: agent_pb2_grpc.AgentServiceAsyncStub = agent_pb2_grpc.AgentServiceStub(
            self._channel(entry)
        )
        try:
            response = await stub.Describe(
                agent_pb2.DescribeRequest(), timeout=self._describe_timeout
            )
        except grpc.aio.AioRpcError as err:
            logger.debug("Describe of agent %s failed: %s", entry.agent_id, err.code().name)
            return
        entry.card = response.card
        if not entry.instance.meta.get(META_MAX_CONCURRENCY) and response.card.max_concurrency:
            entry.max_concurrency = response.card.max_concurrency
            self._on_change()

    # -- selection -------------------------------------------------------------------

    def has_capacity(self, capability: str) -> bool:
        """Whether some agent could take a task of ``capability`` now."""
        return any(a.can_take(capability) for a in self._agents.values())

    def known_capability(self, capability: str) -> bool:
        """Whether some present agent advertises ``capability`` (busy or not)."""
        return any(a.present and capability in a.capabilities for a in self._agents.values())

    def acquire(self, capability: str, *, avoid: Collection[str] = ()) -> AgentLease | None:
        """Reserve a slot on the best agent for ``capability``.

        Args:
            capability: What the task needs.
            avoid: Agent ids where the task failed before: used only when no other
                healthy agent has the capability (a busy one is waited for).

        Returns:
            The lease (release it with :meth:`release`), or None when no agent fits.
        """
        candidates = [a for a in self._agents.values() if a.can_take(capability)]
        preferred = [a for a in candidates if a.agent_id not in avoid]
        if not preferred:
            others = any(
                a.present and capability in a.capabilities and a.admits()
                for a in self._agents.values()
                if a.agent_id not in avoid
            )
            if others:
                # Another agent fits but is busy: wait for it rather than go back to
                # one the task already failed on.
                return None
            preferred = candidates
        while preferred:
            if len(preferred) <= 2:
                pair = preferred
            else:
                pair = random.sample(preferred, 2)
            entry = min(pair, key=lambda a: (a.in_flight, a.in_flight / a.max_concurrency))
            try:
                probe = entry.breaker.acquire()
            except CircuitOpenError:
                preferred.remove(entry)
                continue
            entry.in_flight += 1
            entry.probing = entry.probing or probe
            self._update_in_flight()
            # Execute calls go on a channel without client interceptors: ExecuteStream
            # carries their correlation id, deadline, trace and metrics itself.
            stub = entry.stub_on(self._channel(entry, intercepted=False))
            return AgentLease(entry=entry, stub=stub, probe=probe)
        return None

    def release(self, lease: AgentLease, verdict: Verdict) -> None:
        """Give a slot back and tell the agent's breaker how the attempt went.

        Args:
            lease: From :meth:`acquire`; releasing twice is a no-op.
            verdict: ``"success"`` (the agent answered), ``"failure"`` (transport or
                agent crash) or ``"none"`` (cancelled: says nothing about the agent).
        """
        if lease.released:
            return
        lease.released = True
        entry = lease.entry
        entry.in_flight = max(entry.in_flight - 1, 0)
        if lease.probe:
            entry.probing = False
        if verdict == "success":
            entry.breaker.record_success(lease.probe)
        elif verdict == "failure":
            entry.breaker.record_failure(lease.probe)
        else:
            entry.breaker.release(lease.probe)
        self._forget_if_idle(entry)
        if self._agents.get(entry.agent_id) is entry:
            self._update_in_flight()  # a slot is all that changed
        else:
            self._update_metrics()
        self._on_change()

    def views(self, capability: str = "") -> list[AgentView]:
        """Every known agent (optionally only those with ``capability``), by id."""
        views = []
        for entry in sorted(self._agents.values(), key=lambda a: a.agent_id):
            if capability and capability not in entry.capabilities:
                continue
            views.append(
                AgentView(
                    agent_id=entry.agent_id,
                    name=entry.name,
                    version=entry.instance.meta.get(META_VERSION, ""),
                    address=entry.instance.endpoint,
                    capabilities=entry.capabilities,
                    max_concurrency=entry.max_concurrency,
                    in_flight=entry.in_flight,
                    healthy=entry.present,
                    draining=not entry.present and entry.in_flight > 0,
                    circuit_open=entry.breaker.state is CircuitState.OPEN,
                    last_seen_ns=entry.last_seen_ns,
                    card=entry.card,
                )
            )
        return views

    def _update_in_flight(self) -> None:
        metrics.AGENT_IN_FLIGHT.set(sum(a.in_flight for a in self._agents.values()))

    def _update_metrics(self) -> None:
        present = [a for a in self._agents.values() if a.present]
        counts = dict.fromkeys(self._capabilities_seen, 0)
        for entry in present:
            for capability in entry.capabilities:
                counts[capability] = counts.get(capability, 0) + 1
        self._capabilities_seen.update(counts)
        for capability, count in counts.items():
            metrics.CAPABILITY_AGENTS.labels(capability).set(count)
        metrics.AGENTS.labels("healthy").set(len(present))
        metrics.AGENTS.labels("draining").set(len(self._agents) - len(present))
        metrics.AGENT_IN_FLIGHT.set(sum(a.in_flight for a in self._agents.values()))
        metrics.AGENT_SLOTS.set(sum(a.max_concurrency for a in present))


class AttemptError(Exception):
    """An Execute call ended without a result or error message from the agent.

    Attributes:
        detail: The classified error recorded with the attempt.
        verdict: What it says about the agent, for its circuit breaker.
    """

    def __init__(self, detail: common_pb2.ErrorDetail, verdict: Verdict) -> None:
        """Create the error.

        Args:
            detail: The classified error.
            verdict: ``"failure"`` when the agent (or the way to it) is at fault.
        """
        self.detail = detail
        self.verdict = verdict
        super().__init__(f"{detail.code} {detail.reason}: {detail.message}")


# How a failed Execute call is treated: (retryable, counts against the agent's breaker).
# Errors about the task itself (bad input) are final; everything that says "this agent
# or the path to it is in trouble" may succeed on another agent.
_RPC_CLASSES: dict[grpc.StatusCode, tuple[bool, Verdict]] = {
    grpc.StatusCode.UNAVAILABLE: (True, "failure"),
    grpc.StatusCode.UNKNOWN: (True, "failure"),
    grpc.StatusCode.INTERNAL: (True, "failure"),
    grpc.StatusCode.DATA_LOSS: (True, "failure"),
    grpc.StatusCode.UNIMPLEMENTED: (True, "failure"),
    grpc.StatusCode.UNAUTHENTICATED: (True, "failure"),
    grpc.StatusCode.PERMISSION_DENIED: (True, "failure"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (True, "none"),
    grpc.StatusCode.ABORTED: (True, "none"),
    grpc.StatusCode.CANCELLED: (True, "none"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (False, "none"),
}


def classify_rpc_error(err: grpc.aio.AioRpcError, agent_id: str) -> AttemptError:
    """Turn a failed Execute call into a classified attempt error."""
    return classify_status(err.code(), from_rpc_error(err), agent_id)


def classify_status(code: grpc.StatusCode, domain: HivewireError, agent_id: str) -> AttemptError:
    """Classify an attempt that ended with status ``code`` (the server's error ``domain``).

    One place for an ``Execute`` call's status and for the same status carried for
    one attempt on a ``Link`` (link.py), so both end an attempt alike.
    """
    retryable, verdict = _RPC_CLASSES.get(code, (False, "success"))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason, message = "DEADLINE_EXCEEDED", "the task's deadline passed while the agent ran it"
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        reason = "AGENT_UNAVAILABLE"
        message = f"agent {agent_id} unreachable or gone: {domain.message}"
    elif retryable:
        reason = domain.reason if domain.reason not in ("UNKNOWN", code.name) else "AGENT_FAILED"
        message = f"agent {agent_id} failed the call: {domain.message}"
    else:
        reason, message = domain.reason, domain.message
    detail = common_pb2.ErrorDetail(
        code=code.name,
        reason=reason,
        message=message,
        retryable=retryable,
        metadata={"agent_id": agent_id, **domain.metadata},
    )
    return AttemptError(detail, verdict)


class ExecuteStream:
    """One ``AgentService.Execute`` call: send assignment, cancel and input; read messages.

    The call goes on a channel without client interceptors (one extra task and queue
    per call and per message in grpc.aio, measured in docs/performance.md): its client
    span, trace context and ``grpc_client_*`` metrics are made here instead, and
    ``metadata`` carries the correlation id.

    Args:
        lease: The agent slot the call runs on.
        timeout: Seconds until the task's deadline (the call's deadline).
        metadata: Call metadata (task id, attempt, token budget, correlation id).
    """

    def __init__(
        self, lease: AgentLease, *, timeout: float, metadata: Sequence[tuple[str, str]]
    ) -> None:
        self._agent_id = lease.agent_id
        span, headers = tracing.client_span(EXECUTE_METHOD)
        self._call = lease.stub.Execute(
            timeout=max(timeout, 0.001), metadata=(*metadata, *headers.items())
        )
        tracing.end_with_call(span, self._call)
        observe_client_call(self._call, "bidi_stream", EXECUTE_METHOD)
        self._write_lock = asyncio.Lock()
        self._half_closed = False

    async def send(self, request: agent_pb2.ExecuteRequest) -> bool:
        """Send one message; returns False when the call is already over."""
        async with self._write_lock:
            if self._half_closed or self._call.done():
                return False
            try:
                await self._call.write(request)
            except WRITE_ERRORS as exc:
                # The read side reports why the call ended; a lost write is not news.
                logger.debug("write to agent %s failed: %r", self._agent_id, exc)
                return False
            return True

    async def close_sending(self) -> None:
        """Half-close: nothing more will be sent."""
        async with self._write_lock:
            if self._half_closed or self._call.done():
                return
            self._half_closed = True
            with contextlib.suppress(*WRITE_ERRORS):
                await self._call.done_writing()

    async def receive(self) -> agent_pb2.ExecuteResponse | None:
        """The next message from the agent; None when the agent closed the stream.

        Raises:
            AttemptError: The call failed (transport, status, deadline).
        """
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise classify_rpc_error(err, self._agent_id) from err
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, agent_pb2.ExecuteResponse)
        return message

    async def finish(self, within: float) -> None:
        """Wait, at most ``within`` seconds, for the agent to end the call with its status.

        Called after the agent's last message and the half-close. Cancelling instead
        would end every finished attempt as a cancelled call on both ends (a
        ``RST_STREAM`` the agent has to unwind, per task): measured as memory that
        grows with every task in the process on the other end.
        """
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(within):
                await self._call.code()

    def cancel(self) -> None:
        """Cancel the call (the agent's handler is cancelled); a no-op once it ended."""
        self._call.cancel()
