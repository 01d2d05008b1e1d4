"""The benchmark agent: capabilities that do nothing, so what is measured is the mesh.

Served like any agent (``python -m hivewire.services.agent bench.agent:BenchAgent``,
with the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio

from hivewire.services.agent import Agent, Payload, TaskContext, capability


class BenchAgent(Agent):
    """Trivial capabilities for mesh benchmarks."""

    name = "bench"
    version = "1.0.0"
    max_concurrency = 64

    @capability("noop", description="Returns its input text at once.")
    async def noop(self, task: Payload, ctx: TaskContext) -> str:
        """The whole task is the mesh: submit, schedule, Execute, result, finish."""
        return task.text

    @capability("soak", description="One model call and one tool call, then its input back.")
    async def soak(self, task: Payload, ctx: TaskContext) -> str:
        """A task that crosses every service: coordinator, agent, model and tool."""
        await ctx.model.generate(task.text, max_tokens=8)
        await ctx.tools.invoke("calculator", {"expression": "6*7"})
        return task.text

    @capability("hold", description="Stays running until cancelled (keeps a task open).")
    async def hold(self, task: Payload, ctx: TaskContext) -> str:
        """Block until the coordinator cancels the task or its deadline passes."""
        await asyncio.Event().wait()
        return ""
