"""A Link carries many attempts in one stream: its messages must stay within the
message-size limit that each attempt's own Execute call stays within.
"""

from __future__ import annotations

import asyncio

import pytest

from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.coordinator.link import LinkAttempt, open_stream
from hivewire.services.runtime.config import DEFAULT_MAX_MESSAGE_BYTES
from tests.conftest import Pki
from tests.integration.test_agent_helpers import agent_settings, assignment, serve_in_process
from tests.integration.test_coordinator_link import (
    Worker,
    _metadata,
    lease_on,
    until_end,
)

pytestmark = pytest.mark.timeout(60)

BIG = "x" * (DEFAULT_MAX_MESSAGE_BYTES * 2 // 3)
"""An input that fits one Execute message, but not twice in one message."""


async def test_attempts_whose_frames_pile_up_do_not_break_the_link(pki: Pki) -> None:
    worker = Worker(open_all=True)
    async with (
        serve_in_process(worker, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        # The link is up and answering.
        first = open_stream(lease, timeout=30, metadata=_metadata("first"), link=True)
        await first.send(assignment("wait", text="first", task_id="first"))
        assert await until_end(first) == "done first"
        first.cancel()
        # Two big assignments posted together (as two attempts starting at once do).
        streams = []
        for name in ("a", "b"):
            stream = open_stream(lease, timeout=30, metadata=_metadata(name), link=True)
            assert isinstance(stream, LinkAttempt)
            await stream.send(assignment("wait", text=BIG[:-1] + name, task_id=name))
            streams.append(stream)
        for name, stream in zip(("a", "b"), streams, strict=True):
            assert (await until_end(stream)).endswith(name)
            stream.cancel()


class Big(Agent):
    """``big`` waits for its gate, then answers with a big output."""

    name = "big"
    version = "1.0.0"
    description = "Link size tests."
    max_concurrency = 8

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    @capability
    async def big(self, task: Payload, ctx: TaskContext) -> str:
        """A big answer."""
        await self.gate.wait()
        return BIG[: -len(task.text)] + task.text


async def test_results_that_pile_up_do_not_break_the_link(pki: Pki) -> None:
    worker = Big()
    async with (
        serve_in_process(worker, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        streams = []
        for name in ("a", "b"):
            stream = open_stream(lease, timeout=30, metadata=_metadata(name), link=True)
            # Small inputs; the handler answers with a big output.
            await stream.send(assignment("big", text=name, task_id=name))
            streams.append(stream)
            assert (await stream.receive()) is not None  # started
        worker.gate.set()  # both results are ready at once
        for name, stream in zip(("a", "b"), streams, strict=True):
            assert (await until_end(stream)).endswith(name)
            stream.cancel()
