"""The gateway's agent card: every capability the coordinator routes to, as a skill.

:class:`CardSource` asks the coordinator's ``ListAgents`` every ``card_refresh``
seconds and rebuilds the card when agents join or leave; the card route and the
handler read :attr:`CardSource.card`. A refresh that fails keeps the last card.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from a2a.types import a2a_pb2 as a2a
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol

from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

MTLS_SCHEME = "mtls"
"""Name of the mutual-TLS security scheme in the card."""

BEARER_SCHEME = "bearer"
"""Name of the bearer-credential (API key or JWT) security scheme in the card."""

INPUT_MODES = ("text/plain", "application/json", "application/octet-stream")
OUTPUT_MODES = ("text/plain", "application/json", "application/octet-stream")
_SERVING = (coordinator_pb2.AGENT_HEALTH_HEALTHY, coordinator_pb2.AGENT_HEALTH_UNSPECIFIED)


@dataclass(frozen=True)
class CardIdentity:
    """What the card says about the gateway itself."""

    name: str
    description: str
    version: str
    jsonrpc_url: str
    grpc_url: str
    bearer: bool = False
    """Whether bearer credentials (API keys, JWT) are accepted, besides mTLS."""


def skills_of(agents: Sequence[coordinator_pb2.AgentStatus]) -> list[a2a.AgentSkill]:
    """One skill per capability of the serving agents, sorted by id.

    A capability several agents offer is one skill tagged with each agent's name.
    """
    found: dict[str, a2a.AgentSkill] = {}
    for agent in agents:
        if agent.health not in _SERVING:
            continue
        for cap in agent.card.capabilities:
            skill = found.get(cap.name)
            if skill is None:
                description = cap.description or cap.name
                for label, text in (("input", cap.input_description),
                                    ("output", cap.output_description)):  # fmt: skip
                    if text:
                        description += f" ({label}: {text})"
                skill = a2a.AgentSkill(
                    id=cap.name,
                    name=cap.name,
                    description=description,
                    input_modes=list(INPUT_MODES),
                    output_modes=list(OUTPUT_MODES),
                )
                found[cap.name] = skill
            if agent.card.name and agent.card.name not in skill.tags:
                skill.tags.append(agent.card.name)
    return [found[name] for name in sorted(found)]


def build_card(identity: CardIdentity, skills: Sequence[a2a.AgentSkill]) -> a2a.AgentCard:
    """The agent card: both bindings, streaming, the security schemes, and ``skills``.

    Each scheme is a requirement of its own (either suffices): ``mtls`` always,
    ``bearer`` when the gateway accepts API keys or JWT.
    """
    card = a2a.AgentCard(
        name=identity.name,
        description=identity.description,
        version=identity.version,
        default_input_modes=list(INPUT_MODES),
        default_output_modes=list(OUTPUT_MODES),
    )
    card.supported_interfaces.append(
        a2a.AgentInterface(
            url=identity.jsonrpc_url,
            protocol_binding=TransportProtocol.JSONRPC.value,
            protocol_version=PROTOCOL_VERSION_1_0,
        )
    )
    card.supported_interfaces.append(
        a2a.AgentInterface(
            url=identity.grpc_url,
            protocol_binding=TransportProtocol.GRPC.value,
            protocol_version=PROTOCOL_VERSION_1_0,
        )
    )
    card.capabilities.streaming = True
    card.capabilities.push_notifications = False
    card.security_schemes[
        MTLS_SCHEME
    ].mtls_security_scheme.description = (
        "Mutual TLS: a client certificate issued by the mesh CA (hivewire certs issue)."
    )
    card.security_requirements.add().schemes[MTLS_SCHEME].SetInParent()
    if identity.bearer:
        bearer = card.security_schemes[BEARER_SCHEME].http_auth_security_scheme
        bearer.scheme = "Bearer"
        bearer.bearer_format = "hivewire API key (hwk_...) or JWT"
        bearer.description = (
            "Authorization: Bearer <credential>: an API key made by `hivewire keys create`, "
            "or a JWT of the configured identity provider. The principal owns its tasks."
        )
        card.security_requirements.add().schemes[BEARER_SCHEME].SetInParent()
    card.skills.extend(skills)
    return card


class CardSource:
    """The current card, refreshed from the coordinator's ``ListAgents``."""

    def __init__(
        self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, *, interval: float
    ) -> None:
        """Start without skills; :meth:`set_identity` once the gateway's URLs are known."""
        self._stub = stub
        self._interval = interval
        self._identity: CardIdentity | None = None
        self._ready = asyncio.Event()
        self._skills: list[a2a.AgentSkill] = []
        self.card = a2a.AgentCard()

    @property
    def identity(self) -> CardIdentity:
        """The gateway's name and URLs."""
        if self._identity is None:
            raise RuntimeError("the card's identity is not set yet")
        return self._identity

    def set_identity(self, identity: CardIdentity) -> None:
        """Set the gateway's name and URLs (the card is served from then on)."""
        self._identity = identity
        self.card = build_card(identity, self._skills)
        self._ready.set()

    @property
    def skill_ids(self) -> frozenset[str]:
        """The skills the card lists now."""
        return frozenset(skill.id for skill in self._skills)

    async def refresh(self) -> None:
        """Rebuild the skills from ``ListAgents`` (raises what the call raises)."""
        response = await self._stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=10)
        skills = skills_of(response.agents)
        if [s.id for s in skills] != [s.id for s in self._skills]:
            logger.info("agent card skills: %s", ", ".join(s.id for s in skills) or "none")
        self._skills = skills
        if self._identity is not None:
            self.card = build_card(self._identity, skills)

    async def run(self) -> None:
        """Refresh every interval until cancelled; failures keep the last skills."""
        while True:
            try:
                await self.refresh()
            except grpc.aio.AioRpcError as exc:
                logger.warning("agent card refresh failed: %s %s", exc.code().name, exc.details())
            await asyncio.sleep(self._interval)

    async def current(self, _: a2a.AgentCard | None = None) -> a2a.AgentCard:
        """The card now (the card route's per-request modifier)."""
        await self._ready.wait()
        return self.card

    async def close(self, task: asyncio.Task[None]) -> None:
        """Stop the refresh task."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
