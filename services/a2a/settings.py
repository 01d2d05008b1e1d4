"""Settings of the A2A gateway: the ``a2a`` section, and the settings
of the gateway and adapter processes (the shared ones plus their sections).

Environment variables use the nested form ``HIVEWIRE_A2A__<FIELD>``, for example
``HIVEWIRE_A2A__HTTP_PORT=50055``. Remote A2A agents for the adapter agent are a JSON
list: ``HIVEWIRE_A2A__REMOTE_AGENTS='[{"card_url": "https://..."}]'``. See docs/interop.md.

This module imports nothing of the gateway itself, so it loads without it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hivewire.services.agent.settings import AgentProcessSettings
from hivewire.services.runtime.ports import A2A_HTTP_PORT


class A2aSettings(BaseModel):
    """The A2A gateway (``hivewire a2a``) and the remote-A2A adapter agent."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    coordinator_address: str = Field(
        "127.0.0.1:50051", description="host:port of the coordinator the gateway calls."
    )
    http_port: int = Field(
        A2A_HTTP_PORT, ge=0, le=65535, description="HTTPS port of JSON-RPC and the agent card."
    )
    public_host: str | None = Field(
        None, description="Host written into the card's URLs; defaults to the advertised host."
    )
    card_refresh: float = Field(
        5.0, gt=0, description="Seconds between refreshes of the card's skills from ListAgents."
    )
    name: str = Field("hivewire", description="The gateway's agent card name.")
    description: str = Field(
        "A hivewire mesh: every capability its agents register is a skill.",
        description="The gateway's agent card description.",
    )
    default_skill: str = Field(
        "", description="Skill used when a message names none; empty means one must be named."
    )
    task_timeout: float | None = Field(
        None, gt=0, description="Timeout (s) of tasks started over A2A; unset = coordinator's."
    )
    remote_card_url: str = Field(
        "", description="Adapter agent: URL of the remote A2A agent's card (docs/interop.md)."
    )
    remote_ca_file: str = Field(
        "", description="Adapter agent: CA bundle to verify the remote agent; empty = system's."
    )
    remote_client_identity: str = Field(
        "", description="Adapter agent: mesh identity presented to the remote agent (mTLS)."
    )
    remote_skill_prefix: str = Field(
        "", description="Adapter agent: prefix of the capability names of the remote skills."
    )


class A2aProcessSettings(AgentProcessSettings):
    """The A2A processes' settings: the shared ones, the ``a2a`` section and, for the
    adapter agent (an agent process), the ``agent`` section.
    """

    a2a: A2aSettings = Field(
        default_factory=A2aSettings, description="A2A gateway and adapter (docs/interop.md)."
    )
