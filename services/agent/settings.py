"""Settings of an agent process: the ``agent`` section, and the agent
process's settings (the shared ones plus that section).

Environment variables use the nested form ``HIVEWIRE_AGENT__<FIELD>``, for example
``HIVEWIRE_AGENT__MODEL_ADDRESS=127.0.0.1:50052``. Lists are JSON:
``HIVEWIRE_AGENT__ALLOWED_CALLERS='["spiffe://hivewire.local/coordinator/*"]'``.
"""

from __future__ import annotations

from pydantic import Field

from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.sections import Section

DEFAULT_ALLOWED_CALLERS = ("spiffe://hivewire.local/coordinator/*",)
"""Only the coordinator may run tasks on an agent (DESIGN.md section 6)."""


class AgentSettings(Section):
    """How an agent process serves, whom it obeys and where its model and tools are."""

    name: str | None = Field(
        None, description="Overrides the agent card's name (and so the default identity)."
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Overrides the agent's own max_concurrency."
    )
    allowed_callers: tuple[str, ...] = Field(
        DEFAULT_ALLOWED_CALLERS,
        description="SPIFFE ids (shell-style patterns) allowed to call Execute.",
    )
    model_address: str | None = Field(
        None, description="host:port of the model service; unset = resolve hivewire-model."
    )
    tool_address: str | None = Field(
        None, description="host:port of the tool service; unset = resolve hivewire-tool."
    )
    coordinator_address: str | None = Field(
        None,
        description="host:port of the coordinator for sub-tasks; unset = resolve "
        "hivewire-coordinator.",
    )
    coordinator_service: str = Field(
        "hivewire-coordinator", description="Registry name of coordinators (for sub-tasks)."
    )
    model_service: str = Field("hivewire-model", description="Registry name of the model service.")
    tool_service: str = Field("hivewire-tool", description="Registry name of the tool service.")
    service_name: str = Field("hivewire-agent", description="Registry name agents register as.")
    cancel_grace: float = Field(
        1.0, ge=0, description="Seconds a cancelled handler gets before the attempt ends anyway."
    )
    coalesce_partials: bool = Field(
        True,
        description="Send partial chunks that queued up behind a busy stream as one "
        "(never waits for more; off: one message per chunk).",
    )
    registration: bool = Field(
        True, description="Register in discovery (off for tests and debugging)."
    )


class AgentProcessSettings(Settings):
    """An agent process's settings: the shared ones and the ``agent`` section."""

    agent: AgentSettings = Field(
        default_factory=AgentSettings, description="Agent processes (docs/agents.md)."
    )
