"""Settings of the dashboard: the ``dashboard`` section of the shared settings.

``HIVEWIRE_DASHBOARD__PORT=8443``, ``HIVEWIRE_DASHBOARD__TOKENS='{"<token>":
"spiffe://hivewire.local/client/alice"}'``. This module must not import the shared
settings (they import it).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

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
