"""The registry contract every hivewire service codes against.

A service registers one :class:`Instance` per running process, the coordinator and agents
resolve healthy instances of a logical service (optionally by capability tag) and watch a
service for changes. Two backends implement :class:`Registry`: the embedded default on the
mesh's own NATS (``discovery/embedded.py``) and Consul (``discovery/consul.py``); both pass
the same contract test suite.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = [
    "Instance",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "instance_name",
    "new_instance_id",
    "sort_instances",
]

# Names end up in Consul service IDs, URL paths and NATS KV keys (`<service>.<instance_id>`):
# "." would split a KV key, "/" a URL path, so both are excluded.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Consul's ValidateServiceMetadata limits, applied everywhere so every backend accepts the
# same instances (the contract suite relies on that).
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_META_MAX_VALUE = 512
_META_MAX_PAIRS = 64
_UUID_SUFFIX_RE = re.compile(r"^(?P<name>.+)-[0-9a-f]{8}$")

#: Metadata key giving an instance an explicit, stable name (for example ``summarizer-a``).
#: A newly registered instance with the same explicit name, service and address replaces
#: the registered one wherever it listens now: a restart on another port never piles up
#: next to its own stale entry. Without it, only a restart on the same port replaces.
META_INSTANCE_NAME = "instance_name"


class RegistryError(Exception):
    """A registry operation was rejected (bad instance, ACL denied, misconfiguration)."""


class RegistryUnavailableError(RegistryError):
    """The registry backend (NATS or Consul) could not be reached."""


@dataclass(frozen=True)
class Instance:
    """One running instance of a logical service.

    Attributes:
        service: Logical service name, e.g. ``"hivewire-agent"``.
        instance_id: Unique per running instance, e.g. ``new_instance_id("planner")``.
        address: Host to dial.
        port: Port to dial.
        tags: Capabilities (agents list their capability names).
        meta: String metadata: version, max_concurrency, agent_name, tls_server_name ...
        healthy: Whether the instance is serving; resolve and watch return healthy ones only.
    """

    service: str
    instance_id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.service):
            raise ValueError(f"invalid service name {self.service!r}: use [A-Za-z0-9_-]")
        if not _NAME_RE.match(self.instance_id):
            raise ValueError(f"invalid instance_id {self.instance_id!r}: use [A-Za-z0-9_-]")
        if not self.address or self.address in ("0.0.0.0", "::"):
            raise ValueError(f"invalid address {self.address!r}: give a host peers can dial")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid port {self.port}")
        tags = tuple(self.tags)
        for tag in tags:
            if not tag or not isinstance(tag, str):
                raise ValueError(f"invalid tag {tag!r}")
        meta = dict(self.meta)
        if len(meta) > _META_MAX_PAIRS:
            raise ValueError(f"at most {_META_MAX_PAIRS} meta pairs")
        for key, value in meta.items():
            if not _META_KEY_RE.match(key) or key.lower().startswith("consul-"):
                raise ValueError(f"invalid meta key {key!r}")
            if not isinstance(value, str) or len(value) > _META_MAX_VALUE:
                raise ValueError(f"invalid meta value for {key!r}")
        # Frozen and hashable: instances go into sets when watchers diff results.
        object.__setattr__(self, "tags", tags)
        object.__setattr__(self, "meta", MappingProxyType(meta))

    def __hash__(self) -> int:
        return hash(
            (
                self.service,
                self.instance_id,
                self.address,
                self.port,
                self.tags,
                tuple(sorted(self.meta.items())),
                self.healthy,
            )
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Instance):
            return NotImplemented
        return (
            self.service == other.service
            and self.instance_id == other.instance_id
            and self.address == other.address
            and self.port == other.port
            and self.tags == other.tags
            and dict(self.meta) == dict(other.meta)
            and self.healthy == other.healthy
        )

    @property
    def endpoint(self) -> str:
        """``host:port`` to dial (IPv6 hosts bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the embedded backend's stored value)."""
        return {
            "service": self.service,
            "instance_id": self.instance_id,
            "address": self.address,
            "port": self.port,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "healthy": self.healthy,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Instance:
        """Rebuild an instance from :meth:`to_json` output.

        Raises:
            ValueError: The data is not a valid instance.
        """
        try:
            tags = data.get("tags") or []
            meta = data.get("meta") or {}
            port = data["port"]
            if not isinstance(tags, list) or not isinstance(meta, dict):
                raise TypeError("tags must be a list and meta an object")
            if not isinstance(port, int):
                raise TypeError("port must be an integer")
            return cls(
                service=str(data["service"]),
                instance_id=str(data["instance_id"]),
                address=str(data["address"]),
                port=port,
                tags=tuple(str(t) for t in tags),
                meta={str(k): str(v) for k, v in meta.items()},
                healthy=bool(data.get("healthy", True)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a registry instance: {exc}") from exc


def new_instance_id(name: str) -> str:
    """Return a fresh per-process instance id: ``<name>-<8 hex digits>``."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def instance_name(instance: Instance) -> str:
    """The logical name of an instance, stable across restarts.

    ``meta["instance_name"]`` when set, else the instance id without the suffix that
    :func:`new_instance_id` appends, else the instance id itself.
    """
    explicit = instance.meta.get(META_INSTANCE_NAME)
    if explicit:
        return explicit
    match = _UUID_SUFFIX_RE.match(instance.instance_id)
    return match.group("name") if match else instance.instance_id


def is_replaced_by(old: Instance, new: Instance) -> bool:
    """Whether registering ``new`` supersedes the registered ``old`` (a restart of it).

    Only a restart of the same instance replaces it: same service, address and name, and
    either the same port or an explicit stable name (``meta["instance_name"]``) on both.
    Replicas of one agent on one host differ by port, so they all stay registered.
    """
    if (
        old.instance_id == new.instance_id
        or old.service != new.service
        or old.address != new.address
        or instance_name(old) != instance_name(new)
    ):
        return False
    if old.port == new.port:
        # Two live processes cannot listen on one host:port: the old one is gone.
        return True
    return bool(old.meta.get(META_INSTANCE_NAME)) and bool(new.meta.get(META_INSTANCE_NAME))


def sort_instances(instances: Iterable[Instance]) -> list[Instance]:
    """Instances in a stable order (by instance id), so results compare as lists."""
    return sorted(instances, key=lambda i: i.instance_id)


@runtime_checkable
class Registry(Protocol):
    """Service registry: register, resolve and watch healthy instances.

    Use as an async context manager (``async with open_registry(...) as registry``) or call
    :meth:`start` and :meth:`close`; background work (heartbeats, reconnects) lives between.
    """

    async def start(self) -> None:
        """Connect and start background work."""
        ...

    async def register(self, instance: Instance) -> None:
        """Register (or re-register) an instance and keep it alive until deregistered.

        Registering an id again replaces its definition. A backend outage does not raise:
        the registry keeps retrying in the background.

        Raises:
            RegistryError: The backend rejected the instance (ACL denied, invalid).
        """
        ...

    async def set_healthy(self, instance_id: str, healthy: bool) -> None:
        """Mark a registered instance (not) serving, e.g. NOT_SERVING while draining.

        Raises:
            KeyError: The instance was not registered through this registry.
        """
        ...

    async def deregister(self, instance_id: str) -> None:
        """Stop heartbeats and remove the instance (idempotent)."""
        ...

    async def resolve(self, service: str, *, tag: str | None = None) -> list[Instance]:
        """Return the healthy instances of ``service`` (with ``tag`` when given).

        Raises:
            RegistryUnavailableError: The backend could not be reached.
        """
        ...

    def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Yield the healthy set of ``service`` now, then again after every change.

        Never raises on a backend outage: it logs, keeps the last known set and retries.
        """
        ...

    async def close(self) -> None:
        """Deregister what this registry registered, stop background work, disconnect."""
        ...

    async def __aenter__(self) -> Self:
        """Start the registry."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the registry."""
        ...
