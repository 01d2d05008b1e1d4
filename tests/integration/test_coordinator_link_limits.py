"""A Link carries many attempts in one stream: its messages must stay within the
message-size limit that each attempt's own Execute call stays within, and a message
too big for any call ends only its own attempt (as its Execute call would end).
"""

from __future__ import annotations

import asyncio

import pytest

from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.coordinator.dispatch import AttemptError
from hivewire.services.coordinator.link import LinkAttempt, open_stream
from hivewire.services.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, LINK_BATCH_BYTES
from tests.conftest import Pki
from tests.integration.test_agent_helpers import agent_settings, assignment, serve_in_process
from tests.integration.test_coordinator_link import _metadata, lease_on, until_end

pytestmark = pytest.mark.timeout(60)

PART = LINK_BATCH_BYTES * 9 // 10
"""A message that goes on the link; five of them do not fit one gRPC message."""
TOO_BIG = DEFAULT_MAX_MESSAGE_BYTES + 10
"""Bigger than any message."""
NAMES = ("a", "b", "c", "d", "e")


class Sizes(Agent):
    """Handlers with inputs and outputs of chosen sizes."""

    name = "sizes"
    version = "1.0.0"
    description = "Link size tests."
    max_concurrency = 8

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    @capability
    async def echo(self, task: Payload, ctx: TaskContext) -> str:
        """Answers with its input, once the gate opens."""
        await self.gate.wait()
        return task.text

    @capability
    async def big(self, task: Payload, ctx: TaskContext) -> str:
        """Answers with PART bytes ending in its input, once the gate opens."""
        await self.gate.wait()
        return "x" * (PART - len(task.text)) + task.text

    @capability
    async def huge(self, task: Payload, ctx: TaskContext) -> str:
        """Answers with more than fits any message."""
        return "x" * TOO_BIG


async def test_inputs_that_pile_up_go_in_several_messages(pki: Pki) -> None:
    agent = Sizes()
    agent.gate.set()
    async with (
        serve_in_process(agent, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        # The link is up and answering.
        first = open_stream(lease, timeout=30, metadata=_metadata("first"), link=True)
        await first.send(assignment("echo", text="first", task_id="first"))
        assert await until_end(first) == "first"
        first.cancel()
        # Big assignments posted together (as attempts starting at once are).
        streams = []
        for name in NAMES:
            stream = open_stream(lease, timeout=30, metadata=_metadata(name), link=True)
            assert isinstance(stream, LinkAttempt)
            await stream.send(assignment("echo", text="x" * PART + name, task_id=name))
            streams.append(stream)
        for name, stream in zip(NAMES, streams, strict=True):
            assert (await until_end(stream)).endswith(name)
            stream.cancel()


async def test_results_that_pile_up_go_in_several_messages(pki: Pki) -> None:
    agent = Sizes()
    async with (
        serve_in_process(agent, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        streams = []
        for name in NAMES:
            stream = open_stream(lease, timeout=30, metadata=_metadata(name), link=True)
            await stream.send(assignment("big", text=name, task_id=name))
            assert await stream.receive() is not None  # started
            streams.append(stream)
        agent.gate.set()  # every result is ready at once
        for name, stream in zip(NAMES, streams, strict=True):
            assert (await until_end(stream)).endswith(name)
            stream.cancel()


@pytest.mark.parametrize("too_big", ["input", "result"])
@pytest.mark.parametrize("link", [False, True], ids=["execute", "link"])
async def test_a_message_too_big_fails_only_its_attempt(pki: Pki, link: bool, too_big: str) -> None:
    agent = Sizes()
    async with (
        serve_in_process(agent, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        other = open_stream(lease, timeout=30, metadata=_metadata("other"), link=link)
        await other.send(assignment("echo", text="other", task_id="other"))
        assert await other.receive() is not None  # started
        bad = open_stream(lease, timeout=30, metadata=_metadata("bad"), link=link)
        if too_big == "input":
            await bad.send(assignment("echo", text="x" * TOO_BIG, task_id="bad"))
        else:
            await bad.send(assignment("huge", task_id="bad"))
        with pytest.raises(AttemptError) as caught:
            await until_end(bad)
        bad.cancel()
        detail = caught.value.detail
        # What an Execute call too big for a message ends with, on either.
        assert (detail.code, detail.retryable) == ("RESOURCE_EXHAUSTED", True)
        agent.gate.set()
        assert await until_end(other) == "other"
        other.cancel()
