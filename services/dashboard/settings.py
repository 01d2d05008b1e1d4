"""Settings of the dashboard: the ``dashboard`` section, and the
dashboard process's settings (the shared ones, the coordinator's to reach it, and that
section).

``HIVEWIRE_DASHBOARD__PORT=8443``, ``HIVEWIRE_DASHBOARD__TOKENS='{"<token>":
"spiffe://hivewire.local/client/alice"}'``. The dashboard is a client of the
coordinator, so it reads the ``coordinator`` section too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hivewire.services.coordinator.settings import CoordinatorProcessSettings

DASHBOARD_PORT = 8443


class DashboardSettings(BaseModel):
    """Where the dashboard listens and who may log in with a token."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface the HTTPS server binds.")
    port: int = Field(DASHBOARD_PORT, ge=0, le=65535, description="HTTPS port; 0 picks one.")
    tokens: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description=(
            "Login tokens for browsers without a client certificate: token -> the SPIFFE id "
            "the person acts as (the mesh authorization policy applies to it)."
        ),
    )
    events_window: float = Field(
        900.0, gt=0, description="Seconds of event history the events panel starts with."
    )


class DashboardProcessSettings(CoordinatorProcessSettings):
    """The dashboard process's settings: the shared ones, the ``coordinator`` section (to
    reach it) and the ``dashboard`` section.
    """

    dashboard: DashboardSettings = Field(
        default_factory=DashboardSettings,
        description="The operators' web dashboard (docs/observability.md).",
    )
