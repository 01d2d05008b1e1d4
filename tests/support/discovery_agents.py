"""An agent with a capability no other test agent has, for the discovery end-to-end tests.

``python -m hivewire.services.agent tests.support.discovery_agents:ReverserAgent --name reverser``
"""

from __future__ import annotations

import os

from hivewire.services.agent import Agent, Payload, TaskContext, capability


class ReverserAgent(Agent):
    """Reverses text: a capability that only exists while this agent is registered."""

    name = "reverser"
    version = "1.0.0"
    max_concurrency = 4

    @capability("reverse", description="Return the input text reversed.")
    async def reverse(self, task: Payload, ctx: TaskContext) -> dict[str, object]:
        await ctx.progress(0.5, "reverse", "reversing")
        # The pid tells the test which process (before or after a restart) ran the task.
        return {"reversed": task.text[::-1], "pid": os.getpid()}
