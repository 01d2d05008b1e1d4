"""Service settings: the one place that reads the environment.

Every process builds one frozen :class:`Settings` in its ``__main__`` (from
``HIVEWIRE_*`` environment variables, overridden by command-line flags) and passes
it down. Nothing else in hivewire reads ``os.environ``.

:class:`Settings` holds what every process shares (address, TLS, NATS, discovery,
logging, end-user auth, events). Each service owns its section (a frozen pydantic model
in its own ``settings.py``) and composes its process settings from both, e.g.
``class CoordinatorProcessSettings(Settings)`` with a ``coordinator`` field, so this
module never imports a service (docs/architecture.md). Section variables use ``__`` as
the separator, e.g. ``HIVEWIRE_COORDINATOR__MAX_TIMEOUT=3600``. See docs/runtime.md.

Every process still refuses a misspelt variable of *any* section: each service lists
its section under the ``hivewire.settings`` entry-point group (pyproject.toml), and the
check reads every section from there.

A misspelt setting must not silently change nothing: :func:`load_settings` refuses any
``HIVEWIRE_*`` variable that names no setting (and any unknown key in a section given
as JSON or as an override) with :class:`UnknownSettingError`, naming it and the closest
valid name, and every section forbids unknown fields.
"""

from __future__ import annotations

import difflib
import functools
import os
import typing
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hivewire.services.runtime.authn import AuthSettings
from hivewire.services.runtime.events.settings import EventsSettings
from hivewire.services.runtime.tls import TlsFiles

ENV_PREFIX = "HIVEWIRE_"
NESTED_DELIMITER = "__"
SECTIONS_GROUP = "hivewire.settings"
"""Entry-point group naming every service's settings section: ``name = "module:Class"``."""

OTHER_VARIABLES = frozenset(
    {"HIVEWIRE_ENDPOINTS", "HIVEWIRE_HEAP_DUMP_DIR", "HIVEWIRE_API_KEY", "HIVEWIRE_TOKEN"}
)
"""``HIVEWIRE_*`` variables that are not settings: read by the example clients
(``HIVEWIRE_ENDPOINTS``: where ``endpoints.json`` is, docs/clients.md), by the heap
snapshots of the soak benchmark (``HIVEWIRE_HEAP_DUMP_DIR``, runtime/heapdump.py) and by
the CLI (``HIVEWIRE_API_KEY`` / ``HIVEWIRE_TOKEN``: the end user's credential)."""
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LINK_BATCH_BYTES = 1024 * 1024
"""Most bytes of attempts' messages joined into one ``Link`` message (either way). A
message bigger than this goes alone, as in its own ``Execute`` call: a batch must not
exceed the message-size limit that each of its messages stays within."""

LogFormat = Literal["text", "json"]
EventLoop = Literal["asyncio", "uvloop"]


class Settings(BaseSettings):
    """Settings shared by every hivewire service process.

    Values come from, in increasing priority: field defaults, ``HIVEWIRE_*``
    environment variables, then keyword overrides (``load_settings(port=...)``).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port; unset = no metrics server, 0 = any."
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Interface the Prometheus endpoint binds: loopback unless set otherwise.",
    )
    metrics_tls: bool = Field(
        False,
        description="Serve metrics over HTTPS with this identity's certificate, mesh clients only.",
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
    event_loop: EventLoop = Field(
        "asyncio", description="asyncio (the standard loop) or uvloop (docs/performance.md)."
    )
    grace_period: float = Field(
        10.0, ge=0, description="Seconds in-flight calls get to finish on shutdown."
    )
    malloc_trim_interval: float = Field(
        60.0,
        ge=0,
        description="Seconds between returns of the C heap's free pages to the system "
        "(glibc malloc_trim); 0 = never.",
    )
    nats_url: str = Field(
        "tls://127.0.0.1:4222",
        description="NATS server URL(s); tls:// connects with this identity's certificate.",
    )
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

    revoked_certs_file: Path | None = Field(
        None,
        description="Revoked certificate serials and SPIFFE ids, re-read when it changes.",
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="End-user API keys and JWT (docs/security.md)."
    )

    events: EventsSettings = Field(
        default_factory=EventsSettings, description="Events on NATS (docs/events.md)."
    )
    # A service's own section is a field of its process settings, a subclass of this
    # one defined in the service's settings.py (docs/runtime.md).

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


class UnknownSettingError(ValueError):
    """A ``HIVEWIRE_*`` variable or a settings key that names no setting.

    Attributes:
        name: What was given, e.g. ``HIVEWIRE_COORDINATOR__QUEUE_LIMIT``.
        suggestion: The closest valid name, or None when nothing is close.
    """

    def __init__(self, name: str, suggestion: str | None) -> None:
        self.name = name
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        super().__init__(f"unknown setting {name}{hint} (valid settings: docs/runtime.md)")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings section a field holds, when it is one (``X`` or ``X | None``)."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _field_names(model: type[BaseModel]) -> Iterator[tuple[str, Any]]:
    """Every name a field of ``model`` is set by (its name and its aliases), with its type."""
    for name, info in model.model_fields.items():
        yield name, info.annotation
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str) and choice != name:
                    yield choice, info.annotation


def setting_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Every environment variable name that sets something, upper case, with its type.

    Args:
        model: The settings model (a section, when recursing).
        prefix: The variable prefix of ``model``'s fields.

    Returns:
        ``{"HIVEWIRE_PORT": int, "HIVEWIRE_COORDINATOR": CoordinatorSettings,
        "HIVEWIRE_COORDINATOR__DB_PATH": Path, ...}``.
    """
    names: dict[str, Any] = {}
    for name, annotation in _field_names(model):
        env_name = f"{prefix}{name}".upper()
        names[env_name] = annotation
        section = _model_of(annotation)
        if section is not None:
            names.update(setting_names(section, env_name + NESTED_DELIMITER))
    return names


@functools.cache
def sections() -> Mapping[str, type[BaseModel]]:
    """Every service's settings section, by name, from the ``hivewire.settings`` entry points."""
    found: dict[str, type[BaseModel]] = {}
    for point in entry_points(group=SECTIONS_GROUP):
        section = point.load()
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            raise TypeError(f"entry point {point.value} is not a settings section")
        found[point.name] = section
    return found


def known_setting_names() -> dict[str, Any]:
    """:func:`setting_names` of the shared settings and of every service's section."""
    names = setting_names(Settings)
    for name, section in sections().items():
        env_name = f"{ENV_PREFIX}{name}".upper()
        names[env_name] = section
        names.update(setting_names(section, env_name + NESTED_DELIMITER))
    return names


def _closest(name: str, valid: list[str]) -> str | None:
    matches = difflib.get_close_matches(name.upper(), valid, n=1, cutoff=0.6)
    return matches[0] if matches else None


def invalid_settings(error: ValidationError) -> list[str]:
    """A line per refused value of ``error``, naming its ``HIVEWIRE_*`` variable."""
    lines = []
    for item in error.errors():
        name = ENV_PREFIX + NESTED_DELIMITER.join(str(part) for part in item["loc"]).upper()
        lines.append(f"invalid setting {name}: {item['msg']}")  # no value: it may be a secret
    return lines


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``HIVEWIRE_*`` variables that name no setting of any section.

    Args:
        environ: The environment (``os.environ``).

    Raises:
        UnknownSettingError: For the first unknown variable (sorted by name).
    """
    names = known_setting_names()
    valid = sorted(names)
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names or upper in OTHER_VARIABLES:
            continue
        # Keys of a mapping field (HIVEWIRE_MODEL__ROUTES__FAST) are data, not settings.
        head, sep, _ = upper.rpartition(NESTED_DELIMITER)
        while sep and head not in names:
            head, sep, _ = head.rpartition(NESTED_DELIMITER)
        if sep and _is_mapping(names[head]):
            continue
        raise UnknownSettingError(key, _closest(upper, valid))


def _unknown_key(exc: ValidationError, model: type[BaseModel]) -> UnknownSettingError | None:
    """An ``extra_forbidden`` error (a section as JSON or an override) as an unknown setting."""
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            path = NESTED_DELIMITER.join(str(part) for part in error["loc"])
            name = f"{ENV_PREFIX}{path}".upper()
            return UnknownSettingError(name, _closest(name, sorted(setting_names(model))))
    return None


SettingsT = TypeVar("SettingsT", bound=Settings)


@overload
def load_settings(**overrides: Any) -> Settings: ...


@overload
def load_settings(model: type[SettingsT], /, **overrides: Any) -> SettingsT: ...


def load_settings(model: type[Settings] = Settings, /, **overrides: Any) -> Settings:
    """Build the settings from the environment, with explicit overrides on top.

    Args:
        model: The process settings to build: :class:`Settings` or a service's
            subclass of it with the service's own section(s).
        **overrides: Field values, typically from CLI flags. ``None`` means "flag not
            given" and is ignored, so the environment or default applies. A nested
            section takes a dict and is merged field by field with the environment.

    Returns:
        The frozen settings.

    Raises:
        UnknownSettingError: A ``HIVEWIRE_*`` variable, or a key of a section, names
            no setting.
        pydantic.ValidationError: A value (from the environment or an override) is invalid.
    """
    check_environment(os.environ)
    try:
        return model(**_drop_none(overrides))
    except ValidationError as exc:
        unknown = _unknown_key(exc, model)
        if unknown is not None:
            raise unknown from None
        raise
