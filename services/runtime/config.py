"""Service settings: the one place that reads the environment.

Every process builds one frozen :class:`Settings` in its ``__main__`` (from
``HIVEWIRE_*`` environment variables, overridden by command-line flags) and passes
it down. Nothing else in hivewire reads ``os.environ``.

Nested sections (one per service: coordinator, model, tool, events...) are frozen
pydantic models added as fields of :class:`Settings`; their variables use ``__`` as
the separator, e.g. ``HIVEWIRE_COORDINATOR__QUEUE_LIMIT=100``. See docs/runtime.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hivewire.services.agent.settings import AgentSettings
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.dashboard.settings import DashboardSettings
from hivewire.services.model.settings import ModelSettings
from hivewire.services.runtime.events.settings import EventsSettings
from hivewire.services.runtime.tls import TlsFiles
from hivewire.services.tool.settings import ToolSettings

ENV_PREFIX = "HIVEWIRE_"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

LogFormat = Literal["text", "json"]


class Settings(BaseSettings):
    """Settings shared by every hivewire service process.

    Values come from, in increasing priority: field defaults, ``HIVEWIRE_*``
    environment variables, then keyword overrides (``load_settings(port=...)``).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port; unset = no metrics server, 0 = any."
    )
    advertise_host: str | None = Field(
        None, description="Host other services use to reach this one; defaults to host."
    )
    certs_dir: Path = Field(
        Path("certs"), description="Directory with ca.pem, <identity>.pem/.key."
    )
    identity: str = Field("service", description="Certificate base name of this process.")
    log_level: str = Field("INFO", description="Root log level.")
    log_format: LogFormat = Field("text", description="text (local) or json (one object a line).")
    grace_period: float = Field(
        10.0, ge=0, description="Seconds in-flight calls get to finish on shutdown."
    )
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL.")
    discovery: str = Field(
        "nats", description="Registry backend: nats, consul://host:port or static."
    )
    consul_token: str | None = Field(None, repr=False, description="Consul ACL token.")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, gt=0, description="Largest gRPC message sent or received."
    )
    default_deadline: float = Field(
        30.0, gt=0, description="Deadline (s) given to outgoing unary calls that set none."
    )
    ports_file: Path | None = Field(
        None, description="If set, the server writes its bound ports here as JSON once serving."
    )
    authz_policy_file: Path | None = Field(
        None,
        description="Who may call which RPC (TOML, docs/runtime.md); unset = built-in policy.",
    )
    otlp_endpoint: str | None = Field(
        None,
        # The standard OpenTelemetry variables, not HIVEWIRE_*: the exporter reads the
        # rest of its OTEL_EXPORTER_OTLP_* configuration itself (docs/observability.md).
        validation_alias=AliasChoices(
            "otel_exporter_otlp_traces_endpoint", "otel_exporter_otlp_endpoint", "otlp_endpoint"
        ),
        description="OTLP endpoint spans are exported to; unset = spans are not exported.",
    )

    # Per-service sections go below, one frozen BaseModel each (docs/runtime.md).
    coordinator: CoordinatorSettings = Field(
        default_factory=CoordinatorSettings, description="Coordinator (docs/coordinator.md)."
    )
    agent: AgentSettings = Field(
        default_factory=AgentSettings, description="Agent processes (docs/agents.md)."
    )
    tool: ToolSettings = Field(
        default_factory=ToolSettings, description="Tool service (docs/tools.md)."
    )
    model: ModelSettings = Field(
        default_factory=ModelSettings, description="Model service (docs/model.md)."
    )
    events: EventsSettings = Field(
        default_factory=EventsSettings, description="Events on NATS (docs/events.md)."
    )
    dashboard: DashboardSettings = Field(
        default_factory=DashboardSettings,
        description="The operators' web dashboard (docs/observability.md).",
    )

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    def tls_files(self) -> TlsFiles:
        """Return this process's certificate files (``certs_dir`` + ``identity``)."""
        return TlsFiles.for_identity(self.certs_dir, self.identity)

    @property
    def advertised_host(self) -> str:
        """Host to publish in the registry: ``advertise_host``, else ``host``."""
        return self.advertise_host or self.host


def _drop_none(overrides: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        cleaned[key] = _drop_none(value) if isinstance(value, dict) else value
    return cleaned


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, with explicit overrides on top.

    Args:
        **overrides: Field values, typically from CLI flags. ``None`` means "flag not
            given" and is ignored, so the environment or default applies. A nested
            section takes a dict and is merged field by field with the environment.

    Returns:
        The frozen settings.

    Raises:
        pydantic.ValidationError: A value (from the environment or an override) is invalid.
    """
    return Settings(**_drop_none(overrides))
