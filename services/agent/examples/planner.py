"""The planner example agent: turns a goal into a plan with the model, then runs the plan.

Serve it with ``hivewire agent serve hivewire.services.agent.examples.planner:PlannerAgent``.

Input: the goal as text, or JSON ``{"goal": str, "capabilities": [str], "model": str}``.
The model is asked for a plan as JSON (the ``coordinator.v1.Plan`` shape); the plan is
submitted as a sub-task of this task, so the coordinator validates it exactly like a
plan a client submits, runs its steps on the mesh's agents, and this task streams the
plan's progress and returns its result. A model answer that is not a usable plan is a
clear task failure (``PLAN_UNUSABLE`` or ``PLAN_INVALID``) quoting what the model said:
never a crash, and nothing runs.
"""

from __future__ import annotations

import json
from typing import Any

from hivewire.services.agent import (
    Agent,
    Payload,
    PermanentError,
    SubtaskError,
    TaskContext,
    capability,
)

SYSTEM = """You plan work for a team of agents. Answer with one JSON object and nothing else:
{"steps": [{"step_id": "short-id", "capability": "<one of the capabilities>",
"input": {"text": "what this step should do"}, "depends_on": ["step ids"]}],
"aggregation": "AGGREGATION_ALL"}
Use only the capabilities listed. Steps without dependencies run in parallel."""

QUOTE_CHARS = 500
"""How much of an unusable model answer the failure quotes."""


def extract_plan(text: str) -> dict[str, Any]:
    """The JSON object in a model's answer (code fences and prose around it are ignored).

    Raises:
        PermanentError: ``PLAN_UNUSABLE`` when there is no JSON object with steps.
    """
    start, end = text.find("{"), text.rfind("}")
    quoted = " ".join(text.split())[:QUOTE_CHARS]
    if start < 0 or end <= start:
        raise PermanentError(
            "PLAN_UNUSABLE",
            f"the model did not answer with a plan; it said: {quoted}",
            metadata={"model_answer": quoted},
        )
    try:
        plan = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise PermanentError(
            "PLAN_UNUSABLE",
            f"the model's plan is not valid JSON ({exc.msg}); it said: {quoted}",
            metadata={"model_answer": quoted},
        ) from exc
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list):
        raise PermanentError(
            "PLAN_UNUSABLE",
            f"the model's answer has no list of steps; it said: {quoted}",
            metadata={"model_answer": quoted},
        )
    return plan


class PlannerAgent(Agent):
    """Plans a goal into steps for other agents with the model, then runs the plan."""

    name = "planner"
    version = "1.0.0"
    max_concurrency = 4
    labels = {"example": "true", "uses": "model,sub-tasks"}

    @capability(
        "plan",
        description="Turn a goal into a plan of steps for other agents, run it, return its result.",
        input='The goal as text, or JSON {"goal": str, "capabilities": [str], "model": str}.',
        output="JSON {plan, plan_task_id, result}: the plan run and its aggregated output.",
    )
    async def plan(self, task: Payload, ctx: TaskContext) -> Payload:
        """Ask the model for a plan, run it as a sub-task and return its result."""
        options = dict(task.json or {})
        goal = str(options.get("goal") or task.text).strip()
        if not goal:
            raise PermanentError("GOAL_MISSING", "give the goal as text or JSON {goal}")
        capabilities = [str(c) for c in options.get("capabilities") or []]
        prompt = f"Goal: {goal}"
        if capabilities:
            prompt += "\nCapabilities: " + ", ".join(capabilities)
        await ctx.progress(0.1, "plan", "asking the model for a plan")
        answer = await ctx.model.chat(
            [("system", SYSTEM), ("user", prompt)],
            model=str(options.get("model") or ""),
            temperature=0.0,
        )
        plan = extract_plan(answer.text)
        steps = len(plan["steps"])
        await ctx.progress(0.3, "run", f"running a plan of {steps} steps")

        async def forward(event: Any) -> None:
            if event.HasField("step") and event.step.kind == 4:  # STEP_EVENT_KIND_FINISHED
                await ctx.progress(0.3, "run", f"step {event.step.step_id} finished")

        try:
            result = await ctx.subtask(plan=plan, on_event=forward)
        except SubtaskError as err:
            quoted = " ".join(answer.text.split())[:QUOTE_CHARS]
            if err.reason == "PLAN_MALFORMED":
                raise PermanentError(
                    "PLAN_UNUSABLE",
                    f"the model's answer is not shaped like a plan ({err.message}); "
                    f"it said: {quoted}",
                    metadata={"model_answer": quoted},
                ) from err
            if err.metadata.get("code") == "INVALID_ARGUMENT":
                raise PermanentError(
                    "PLAN_INVALID",
                    f"the model's plan was refused ({err.message}); it said: {quoted}",
                    metadata={"model_answer": quoted},
                ) from err
            raise
        await ctx.progress(1.0, "done", "the plan finished")
        output = result.output
        return Payload(
            text=output.text,
            json={
                "plan": plan,
                "plan_task_id": result.task_id,
                "result": dict(output.json) if output.json is not None else output.text,
            },
        )
