"""An agent written with the real SDK for the interop (A2A, MCP) end-to-end tests.

``python -m hivewire.services.agent tests.support.interop_agents:InteropAgent``
"""

from __future__ import annotations

import asyncio
from typing import Any

from hivewire.services.agent import Agent, InputKind, Payload, TaskContext, capability


class InteropAgent(Agent):
    """Streams words, asks questions and runs until cancelled."""

    name = "interop"
    version = "1.0.0"
    max_concurrency = 8

    @capability(
        "spell",
        description="Stream the words of the input text one by one, then count them.",
        input="text",
        output="json with the word count",
    )
    async def spell(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        words = task.text.split()
        for i, word in enumerate(words, start=1):
            await ctx.progress(i / max(len(words), 1), "spell", f"word {i} of {len(words)}")
            await ctx.partial(word + " ", artifact_id="words", last_chunk=i == len(words))
        return {"words": len(words), "text": task.text}

    @capability("wait", description="Report a heartbeat until cancelled.")
    async def wait(self, task: Payload, ctx: TaskContext) -> str:
        beat = 0
        while True:
            beat += 1
            await ctx.progress(0.0, "beat", f"beat {beat}")
            await asyncio.sleep(0.05)

    @capability("greet", description="Ask for a name, then greet it.")
    async def greet(self, task: Payload, ctx: TaskContext) -> str:
        answer = await ctx.request_input("What is your name?")
        return f"hello, {answer.text}"

    @capability("guarded", description="Ask for an approval, then say what was decided.")
    async def guarded(self, task: Payload, ctx: TaskContext) -> str:
        answer = await ctx.request_input(f"May I do {task.text!r}?", kind=InputKind.APPROVAL)
        return "approved" if answer.approved else "refused"
