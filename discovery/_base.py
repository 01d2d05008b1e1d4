"""Lifecycle and bookkeeping shared by the registry backends."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import ClassVar

from hivewire.services.base.lifecycle import StartClose, cancel_and_wait

from .registry import Instance

logger = logging.getLogger(__name__)


class RegistryBase(StartClose, abc.ABC):
    """Context-manager plumbing and the set of instances this process registered."""

    backend: ClassVar[str]

    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}
        self._started = False
        self._closed = False

    @property
    def registered(self) -> dict[str, Instance]:
        """The instances this registry keeps alive, by instance id (a copy)."""
        return dict(self._instances)

    @staticmethod
    def _log_registered(instance: Instance) -> None:
        logger.info(
            "registry: registered %s %s at %s tags=%s",
            instance.service,
            instance.instance_id,
            instance.endpoint,
            ",".join(instance.tags),
        )

    def _require_started(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not self._started:
            raise RuntimeError(f"{type(self).__name__} is not started: use start() or async with")

    async def set_healthy(self, instance_id: str, healthy: bool) -> None:
        """Mark a registered instance (not) serving, e.g. NOT_SERVING while draining.

        Raises:
            KeyError: The instance was not registered through this registry.
        """
        self._require_started()
        current = self._instances[instance_id]
        if current.healthy == healthy:
            return
        updated = dataclasses.replace(current, healthy=healthy)
        self._instances[instance_id] = updated
        logger.info(
            "registry: %s %s is now %s",
            updated.service,
            instance_id,
            "serving" if healthy else "not serving",
        )
        await self._publish_health(updated)

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and start background work."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Deregister, stop background work, disconnect."""

    @abc.abstractmethod
    async def register(self, instance: Instance) -> None:
        """Register an instance and keep it alive."""

    @abc.abstractmethod
    async def deregister(self, instance_id: str) -> None:
        """Remove an instance."""

    @abc.abstractmethod
    async def resolve(self, service: str, *, tag: str | None = None) -> list[Instance]:
        """Healthy instances of a service."""

    @abc.abstractmethod
    def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Healthy sets of a service, now and after every change."""

    @abc.abstractmethod
    async def _publish_health(self, instance: Instance) -> None:
        """Push a health change of a registered instance to the backend."""


class RemoteRegistryBase(RegistryBase):
    """A backend with a server (Consul, NATS KV): connect, heartbeat, deregister, disconnect.

    :meth:`start` connects (:meth:`_connect`) and starts :meth:`_heartbeat_loop`, which
    keeps the registered instances alive; :meth:`close` stops it, removes each
    instance this process registered (:meth:`_forget`) and disconnects
    (:meth:`_disconnect`). ``_closing`` is set as closing begins (watches end on it).
    """

    _heartbeat_task_name: ClassVar[str]
    """The name of the heartbeat task."""

    def __init__(self) -> None:
        super().__init__()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Connect and start heartbeats (a second call does nothing)."""
        if self._started:
            return
        await self._connect()
        self._started = True
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=self._heartbeat_task_name
        )
        self._log_started()

    async def close(self) -> None:
        """Deregister this process's instances, end watches and disconnect."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        await cancel_and_wait([self._heartbeat_task])
        for instance in list(self._instances.values()):
            await self._forget(instance)
        self._instances.clear()
        await self._disconnect()

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Open the connection to the server."""

    @abc.abstractmethod
    def _log_started(self) -> None:
        """Say in the log where the registry is and how it keeps instances alive."""

    @abc.abstractmethod
    async def _heartbeat_loop(self) -> None:
        """Keep the registered instances alive until cancelled."""

    @abc.abstractmethod
    async def _forget(self, instance: Instance) -> None:
        """Remove a registered instance from the server (a failure is only logged)."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection, ending what still uses it."""
