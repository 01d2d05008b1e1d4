"""When partial output chunks may travel as one: the rule every coalescing place shares.

A chunk (``common.v1.PartialResult``, or the agent SDK's chunk of it) *continues* a
run of chunks when it appends to the same artifact (same ``artifact_id`` and ``name``)
that the run's last chunk did not end, and the run and the chunk carry only text, or
only bytes of one ``content_type`` (JSON never merges). A run that continues is sent
as one chunk: its contents in order, replacing or appending as its first chunk did,
ending the artifact when its last chunk does, so what a reader rebuilds is byte for
byte the same. Used where chunks pile up behind a busy writer: the agent runtime's
outbox (``agent/runtime.py``) and the coordinator's journal (``coordinator/journal.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["COALESCE_MAX", "Chunk", "ContentKey", "content_key", "continues"]

COALESCE_MAX = 8 * 1024
"""Most characters (text) or bytes (data) one coalesced chunk carries.

Even all 4-byte UTF-8, it stays under the 64 KiB an event's NATS copy carries whole
(``coordinator/journal.py``).
"""

ContentKey = tuple[str, str]
"""What a chunk's content is, for joining: ``("text" | "data", content_type)``."""


class Chunk(Protocol):
    """The fields of a partial chunk the rule looks at."""

    @property
    def artifact_id(self) -> str: ...

    @property
    def append(self) -> bool: ...

    @property
    def last_chunk(self) -> bool: ...

    @property
    def name(self) -> str: ...


C = TypeVar("C", bound=Chunk)


def content_key(text: str, data: bytes, content_type: str, *, has_json: bool) -> ContentKey | None:
    """The :data:`ContentKey` of a content, None when it never merges (JSON, or a mix)."""
    if has_json or (text and data):
        return None
    return ("data" if data else "text", content_type)


def continues(head: C, last: C, then: C, key: Callable[[C], ContentKey | None]) -> bool:
    """Whether ``then`` can join the run ``head`` .. ``last`` (``key`` reads a content)."""
    kind = key(head)
    return (
        then.append
        and not last.last_chunk
        and then.artifact_id == head.artifact_id
        and then.name == head.name
        and kind is not None
        and kind == key(then)
    )
