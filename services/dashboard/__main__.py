"""``python -m hivewire.services.dashboard``: the dashboard from ``HIVEWIRE_*`` settings."""

from __future__ import annotations

import asyncio

from hivewire.services.dashboard.serve import serve_dashboard
from hivewire.services.dashboard.settings import DashboardProcessSettings
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.tracing import setup_tracing


def main() -> None:
    """Serve the dashboard until SIGTERM."""
    settings = load_settings(DashboardProcessSettings)
    if "identity" not in settings.model_fields_set:
        # The dashboard calls the coordinator as an operator by default.
        settings = settings.model_copy(update={"identity": "admin"})
    setup_logging(settings.log_level, settings.log_format)
    setup_tracing("hivewire-dashboard", otlp_endpoint=settings.otlp_endpoint)
    asyncio.run(serve_dashboard(settings))


if __name__ == "__main__":
    main()
