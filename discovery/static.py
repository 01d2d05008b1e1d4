"""Static registry: a fixed list of instances, for single-process setups and tooling.

``static:`` alone starts empty; ``static:<json>`` or ``static:<path>`` loads a JSON list of
instance objects (``Instance.to_json`` shape). Registrations by this process are added in
memory and seen by this process only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import ClassVar

from ._base import RegistryBase
from .registry import Instance, sort_instances

logger = logging.getLogger(__name__)

__all__ = ["StaticRegistry", "load_static_instances"]


def load_static_instances(spec: str) -> list[Instance]:
    """Parse ``spec`` (JSON text, or a path to a JSON file) into instances.

    Raises:
        ValueError: The JSON is not a list of instance objects.
    """
    spec = spec.strip()
    if not spec:
        return []
    text = spec if spec[0] in "[{" else Path(spec).read_text(encoding="utf-8")
    data: object = json.loads(text)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("static registry: expected a JSON list of instance objects")
    return [Instance.from_json(item) for item in data]


class StaticRegistry(RegistryBase):
    """In-memory registry; the instances never expire.

    Args:
        instances: The instances known from the start.
    """

    backend: ClassVar[str] = "static"

    def __init__(self, instances: Iterable[Instance] = ()) -> None:
        super().__init__()
        self._fixed = {i.instance_id: i for i in instances}
        self._changed = asyncio.Condition()

    def _all(self) -> dict[str, Instance]:
        return {**self._fixed, **self._instances}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def start(self) -> None:
        """Nothing to connect to."""
        self._started = True

    async def close(self) -> None:
        """End watches."""
        self._closed = True
        self._instances.clear()
        await self._notify()

    async def register(self, instance: Instance) -> None:
        """Add or replace an instance (visible to this process only)."""
        self._require_started()
        self._instances[instance.instance_id] = instance
        await self._notify()

    async def deregister(self, instance_id: str) -> None:
        """Remove an instance registered by this process."""
        self._require_started()
        if self._instances.pop(instance_id, None) is not None:
            await self._notify()

    async def _publish_health(self, instance: Instance) -> None:
        await self._notify()

    async def resolve(self, service: str, *, tag: str | None = None) -> list[Instance]:
        """Return the healthy instances of ``service`` (with ``tag`` when given)."""
        self._require_started()
        return sort_instances(
            i
            for i in self._all().values()
            if i.service == service and i.healthy and (tag is None or tag in i.tags)
        )

    async def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Yield the healthy set now and after every change; ends on close."""
        self._require_started()
        last: list[Instance] | None = None
        while not self._closed:
            async with self._changed:
                current = await self.resolve(service)
                if current != last:
                    last = current
                    changed = True
                else:
                    changed = False
                if not changed:
                    await self._changed.wait()
                    continue
            yield current
