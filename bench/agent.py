"""The benchmark agent: capabilities that do nothing, so what is measured is the mesh.

Served like any agent (``python -m hivewire.services.agent bench.agent:BenchAgent``,
with the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import time

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

    @capability(
        "tokens", description="Streams N stamped partial chunks ('N', 'N:gap_ms' or 'N:0:yield')."
    )
    async def tokens(self, task: Payload, ctx: TaskContext) -> str:
        """A token stream: each chunk is ``time.monotonic_ns()`` when it was sent, then a space.

        The clock is the machine's (CLOCK_MONOTONIC), the same in every process, so
        the client can take a token's latency from the agent to itself. Chunks queued
        together may reach the client as one partial event (coalesced); the space
        keeps each token's stamp apart. ``yield`` gives the event loop a turn after
        each token, as a handler relaying a model's stream does (it awaits each token).
        """
        count, _, rest = task.text.partition(":")
        gap, _, mode = rest.partition(":")
        pause = float(gap or 0) / 1000
        for _ in range(int(count)):
            await ctx.partial(f"{time.monotonic_ns()} ")
            if pause:
                await asyncio.sleep(pause)
            elif mode == "yield":
                await asyncio.sleep(0)
        return count

    @capability("hold", description="Stays running until cancelled (keeps a task open).")
    async def hold(self, task: Payload, ctx: TaskContext) -> str:
        """Block until the coordinator cancels the task or its deadline passes."""
        await asyncio.Event().wait()
        return ""
