"""Agents written with the real SDK, served as real processes by the end-to-end tests.

``python -m hivewire.services.agent tests.support.e2e_agents:PacedAgent --name paced-1``
"""

from __future__ import annotations

import asyncio
from typing import Any

from hivewire.services.agent import Agent, Payload, PermanentError, TaskContext, capability


class PacedAgent(Agent):
    """Work that takes a little while and reports progress as it goes."""

    name = "paced"
    version = "1.0.0"
    max_concurrency = 8

    @capability("count", description="Count to steps, one progress event per step.")
    async def count(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        spec = dict(task.json or {})
        steps = int(spec.get("steps", 3))
        interval = float(spec.get("interval", 0.0))
        for i in range(1, steps + 1):
            await ctx.progress(i / steps, f"step-{i}", f"counted {i} of {steps}")
            if interval:
                await asyncio.sleep(interval)
        return {"counted": steps, "attempt": ctx.attempt, "text": task.text}

    @capability("forever", description="Report progress until cancelled.")
    async def forever(self, task: Payload, ctx: TaskContext) -> str:
        beat = 0
        while True:
            beat += 1
            await ctx.progress(0.0, "beat", f"beat {beat}")
            await asyncio.sleep(0.05)

    @capability("ask", description="Ask a person a question and return the answer.")
    async def ask(self, task: Payload, ctx: TaskContext) -> str:
        answer = await ctx.request_input(task.text or "?")
        return f"answer:{answer.text}"

    @capability("fail", description="Always fail, permanently (a saga's failing step).")
    async def fail(self, task: Payload, ctx: TaskContext) -> str:
        raise PermanentError("STEP_FAILED", f"step {task.text or '?'} always fails")

    @capability("undo", description="Undo a plan step, slowly (a saga's compensation).")
    async def undo(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        spec = dict(task.json or {})
        for i in range(1, 21):
            await ctx.progress(i / 20, "undo", f"undoing {spec.get('step_id')}")
            await asyncio.sleep(0.1)
        return {"undone": spec.get("step_id"), "attempt": ctx.attempt}


class TracedAgent(Agent):
    """Thinks with the model service and acts with the tool service: one call each."""

    name = "traced"
    version = "1.0.0"

    @capability("trace", description="Ask the model, then compute with the calculator tool.")
    async def trace(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        reply = await ctx.model.generate(task.text or "hello")
        out = await ctx.tools.invoke("calculator", {"expression": "6 * 7"})
        return {"model": reply.text, "value": out.result.get("value")}
