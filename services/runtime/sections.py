"""What several services' settings sections declare alike, declared once.

A service's section is a :class:`Section` in its own ``settings.py`` (docs/runtime.md,
"Adding a section for your service"): frozen, and refusing a key it does not declare,
which is how a misspelt setting given as JSON or as an override is caught
(:func:`~hivewire.services.runtime.config.load_settings`). A setting two sections mean
the same way takes its type, bounds and description from here; its name stays the
section's own, so each variable (``HIVEWIRE_<SECTION>__<FIELD>``) is the service's. A
section whose service guards dependencies with circuit breakers is a
:class:`BreakerSection`: it has both breaker fields and hands them to the service as one
:class:`~hivewire.services.runtime.breaker.BreakerOptions`; a section whose default
differs declares the field again with its own default::

    class ModelSettings(BreakerSection):
        breaker_reset_timeout: BreakerResetTimeout = 30.0
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hivewire.services.runtime.breaker import BreakerOptions

__all__ = ["BreakerFailureThreshold", "BreakerResetTimeout", "BreakerSection", "Section"]


class Section(BaseModel):
    """A settings section: frozen, and an undeclared key is refused (``extra="forbid"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


BreakerFailureThreshold = Annotated[
    int,
    Field(ge=1, description="Consecutive failures of a dependency that open its circuit."),
]
"""The ``failure_threshold`` of a :class:`~hivewire.services.runtime.breaker.CircuitBreaker`."""

BreakerResetTimeout = Annotated[
    float,
    Field(ge=0, description="Seconds an open circuit waits before a half-open probe."),
]
"""The ``reset_timeout`` of a :class:`~hivewire.services.runtime.breaker.CircuitBreaker`."""


class BreakerSection(Section):
    """A section of a service whose dependencies each sit behind a circuit breaker."""

    breaker_failure_threshold: BreakerFailureThreshold = 5
    breaker_reset_timeout: BreakerResetTimeout = 10.0

    @property
    def breaker(self) -> BreakerOptions:
        """The breaker fields as the runtime's breaker takes them."""
        return BreakerOptions(self.breaker_failure_threshold, self.breaker_reset_timeout)
