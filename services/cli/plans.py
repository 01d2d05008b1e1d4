"""Plan files for ``hivewire submit --plan``: YAML or JSON in the ``coordinator.v1.Plan`` shape.

```yaml
aggregation: all            # all | first_success | vote | aggregator (or AGGREGATION_*)
aggregator_capability: ""   # for aggregation: aggregator
steps:
  - step_id: research
    capability: research
    input: "What is a service mesh?"   # text, or {text: ..., json: {...}}
  - step_id: summary
    capability: summarize
    depends_on: [research]
    compensation_capability: ""
```

The file is only read and shaped here; the coordinator validates the plan (cycles,
unknown dependencies, limits) and answers ``INVALID_ARGUMENT`` with one field
violation per problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from hivewire.coordinator.v1 import coordinator_pb2

__all__ = ["PlanFileError", "load_plan", "plan_from_dict"]

_AGGREGATIONS = {
    "all": "AGGREGATION_ALL",
    "first_success": "AGGREGATION_FIRST_SUCCESS",
    "first-success": "AGGREGATION_FIRST_SUCCESS",
    "vote": "AGGREGATION_VOTE",
    "aggregator": "AGGREGATION_AGGREGATOR",
}


class PlanFileError(ValueError):
    """The plan file cannot be read or does not have the Plan shape."""


def load_plan(path: Path) -> coordinator_pb2.Plan:
    """Read a plan from a YAML or JSON file.

    Raises:
        PlanFileError: Unreadable, not YAML/JSON, or not shaped like a Plan.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlanFileError(
            f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise PlanFileError(f"{path} must hold a mapping with a list of steps")
    return plan_from_dict(data)


def plan_from_dict(data: dict[str, Any]) -> coordinator_pb2.Plan:
    """A Plan from its dict form, with the file's conveniences.

    Conveniences: ``aggregation`` may be a short name (``vote``); a step's ``input``
    may be a plain string (its text).

    Raises:
        PlanFileError: Not shaped like a Plan.
    """
    shaped = dict(data)
    aggregation = shaped.get("aggregation")
    if isinstance(aggregation, str):
        shaped["aggregation"] = _AGGREGATIONS.get(aggregation.lower(), aggregation)
    steps = shaped.get("steps")
    if isinstance(steps, list):
        shaped["steps"] = [
            {**step, "input": {"text": step["input"]}}
            if isinstance(step, dict) and isinstance(step.get("input"), str)
            else step
            for step in steps
        ]
    try:
        return json_format.ParseDict(shaped, coordinator_pb2.Plan())
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise PlanFileError(f"not a plan: {exc}") from exc
