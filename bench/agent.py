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

    @capability("hold", description="Stays running until cancelled (keeps a task open).")
    async def hold(self, task: Payload, ctx: TaskContext) -> str:
        """Block until the coordinator cancels the task or its deadline passes."""
        await asyncio.Event().wait()
        return ""
