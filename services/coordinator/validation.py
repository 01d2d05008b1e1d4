"""Validation of what clients submit: task specs, plans and projects.

Every check adds one field violation, so a client sees all of its mistakes in one
``INVALID_ARGUMENT`` answer, and nothing is stored or run before the whole request
passed. Plans are checked here too (the agent SDK's planner relies on exactly these
rules by submitting what the model proposed).
"""

from __future__ import annotations

import re

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument

__all__ = [
    "CAPABILITY_RE",
    "VALID_STATES",
    "payload_violations",
    "plan_violations",
    "project_violations",
    "validate_spec",
]

CAPABILITY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_STEP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_CAPABILITY_RULE = "must be lower-case letters, digits and dashes (at most 63 characters)"
_STEP_ID_RULE = "must be letters, digits, '_', '.' and '-' (at most 63 characters)"
_MAX_IDEMPOTENCY_KEY = 256
_MAX_LABELS = 64
_MAX_LABEL_KEY = 63
_MAX_LABEL_VALUE = 256
_MAX_METADATA_FIELD = 256
_MAX_ID = 128
_MAX_PROJECT_NAME = 128
_MAX_PROJECT_GOAL = 4096
_VALID_PRIORITIES = frozenset(common_pb2.Priority.values())
_VALID_AGGREGATIONS = frozenset(coordinator_pb2.Aggregation.values())
#: Every ``TaskState`` a client may filter on.
VALID_STATES = frozenset(common_pb2.TaskState.values()) - {common_pb2.TASK_STATE_UNSPECIFIED}


def validate_spec(
    spec: coordinator_pb2.TaskSpec | None,
    settings: CoordinatorSettings,
    *,
    field_prefix: str = "spec",
) -> coordinator_pb2.TaskSpec:
    """Check a task spec and return it normalized (priority, timeout, attempts set).

    Raises:
        InvalidArgument: One field violation per problem.
    """
    s = settings
    p = field_prefix
    if spec is None:
        raise InvalidArgument(violations=[FieldViolation(p, "required")])
    violations: list[FieldViolation] = []
    has_plan = spec.HasField("plan")
    if has_plan:
        violations.extend(plan_violations(spec.plan, settings, field_prefix=f"{p}.plan"))
        if spec.capability:
            violations.append(
                FieldViolation(f"{p}.capability", "must be empty when a plan is given")
            )
    else:
        violations.extend(_capability_violations(f"{p}.capability", spec.capability))
    if spec.priority not in _VALID_PRIORITIES:
        violations.append(FieldViolation(f"{p}.priority", f"unknown priority {spec.priority}"))
    timeout = s.default_timeout
    if spec.HasField("timeout"):
        seconds, nanos = spec.timeout.seconds, spec.timeout.nanos
        if seconds < 0 or nanos < 0:
            violations.append(FieldViolation(f"{p}.timeout", "must not be negative"))
        elif nanos >= 1_000_000_000:
            violations.append(FieldViolation(f"{p}.timeout", "nanos out of range"))
        elif seconds == 0 and nanos == 0:
            violations.append(FieldViolation(f"{p}.timeout", "must be positive when set"))
        else:
            # Deadlines are capped, not rejected: the caller gets the maximum.
            timeout = min(seconds + nanos / 1e9, s.max_timeout)
    if spec.HasField("input"):
        violations.extend(payload_violations(spec.input, settings, f"{p}.input"))
    if spec.max_attempts > s.max_attempts_limit:
        violations.append(
            FieldViolation(f"{p}.max_attempts", f"must be at most {s.max_attempts_limit}")
        )
    if len(spec.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
        violations.append(
            FieldViolation(f"{p}.idempotency_key", f"longer than {_MAX_IDEMPOTENCY_KEY} characters")
        )
    if len(spec.labels) > _MAX_LABELS:
        violations.append(FieldViolation(f"{p}.labels", f"more than {_MAX_LABELS} labels"))
    for name, value in spec.labels.items():
        if not name or len(name) > _MAX_LABEL_KEY:
            violations.append(
                FieldViolation(f"{p}.labels", f"label keys must be 1-{_MAX_LABEL_KEY} chars")
            )
        if len(value) > _MAX_LABEL_VALUE:
            violations.append(
                FieldViolation(f"{p}.labels[{name}]", f"longer than {_MAX_LABEL_VALUE}")
            )
    for attr in ("project_id", "parent_task_id"):
        if len(getattr(spec, attr)) > _MAX_ID:
            violations.append(FieldViolation(f"{p}.{attr}", f"longer than {_MAX_ID} characters"))
    meta = spec.metadata
    for attr in ("source", "user_id", "session_id", "correlation_id"):
        if len(getattr(meta, attr)) > _MAX_METADATA_FIELD:
            violations.append(
                FieldViolation(
                    f"{p}.metadata.{attr}", f"longer than {_MAX_METADATA_FIELD} characters"
                )
            )
    if violations:
        raise InvalidArgument(violations=violations)
    normalized = coordinator_pb2.TaskSpec()
    normalized.CopyFrom(spec)
    if normalized.priority == common_pb2.PRIORITY_UNSPECIFIED:
        normalized.priority = common_pb2.PRIORITY_MEDIUM
    normalized.timeout.CopyFrom(convert.duration(timeout))
    if normalized.max_attempts == 0:
        normalized.max_attempts = s.default_max_attempts
    return normalized


def payload_violations(
    payload: common_pb2.Payload, settings: CoordinatorSettings, path: str
) -> list[FieldViolation]:
    """What is wrong with a payload a client gives a task (its input, an input answer)."""
    violations = []
    size = payload.ByteSize()
    if size > settings.max_input_bytes:
        violations.append(
            FieldViolation(path, f"{size} bytes exceeds the limit of {settings.max_input_bytes}")
        )
    if payload.data and not payload.content_type:
        violations.append(FieldViolation(f"{path}.content_type", "required when data is set"))
    return violations


def plan_violations(
    plan: coordinator_pb2.Plan, settings: CoordinatorSettings, *, field_prefix: str = "plan"
) -> list[FieldViolation]:
    """Every problem of a plan, one field violation each (empty when it is valid).

    Checked: the step count (1 to ``settings.max_plan_steps``), step ids (required,
    unique, well-formed), capabilities, ``depends_on`` naming known steps and no
    dependency cycle (the cycle is named), the aggregation, and an aggregator
    capability for ``AGGREGATION_AGGREGATOR``.
    """
    p = field_prefix
    violations: list[FieldViolation] = []
    steps = list(plan.steps)
    if not steps:
        violations.append(FieldViolation(f"{p}.steps", "a plan needs at least one step"))
    elif len(steps) > settings.max_plan_steps:
        violations.append(
            FieldViolation(
                f"{p}.steps",
                f"{len(steps)} steps exceed the limit of {settings.max_plan_steps}",
            )
        )
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        sp = f"{p}.steps[{i}]"
        step_id_problems = _name_violations(
            f"{sp}.step_id", step.step_id, _STEP_ID_RE, _STEP_ID_RULE
        )
        if step_id_problems:
            violations.extend(step_id_problems)
        elif step.step_id in seen:
            violations.append(
                FieldViolation(
                    f"{sp}.step_id",
                    f"duplicate step id {step.step_id!r} (also steps[{seen[step.step_id]}])",
                )
            )
        else:
            seen[step.step_id] = i
        violations.extend(_capability_violations(f"{sp}.capability", step.capability))
        violations.extend(
            _capability_violations(
                f"{sp}.compensation_capability", step.compensation_capability, required=""
            )
        )
        if step.HasField("input"):
            violations.extend(payload_violations(step.input, settings, f"{sp}.input"))
        for j, dep in enumerate(step.depends_on):
            if dep == step.step_id:
                violations.append(
                    FieldViolation(f"{sp}.depends_on[{j}]", f"step {dep!r} depends on itself")
                )
            elif dep not in {s.step_id for s in steps}:
                violations.append(FieldViolation(f"{sp}.depends_on[{j}]", f"unknown step {dep!r}"))
    cycle = find_cycle(plan)
    if cycle:
        violations.append(FieldViolation(f"{p}.steps", "dependency cycle: " + " -> ".join(cycle)))
    if plan.aggregation not in _VALID_AGGREGATIONS:
        violations.append(
            FieldViolation(f"{p}.aggregation", f"unknown aggregation {plan.aggregation}")
        )
    if plan.aggregation == coordinator_pb2.AGGREGATION_AGGREGATOR:
        violations.extend(
            _capability_violations(
                f"{p}.aggregator_capability",
                plan.aggregator_capability,
                required="required for AGGREGATION_AGGREGATOR",
            )
        )
    return violations


def _name_violations(
    field: str, value: str, pattern: re.Pattern[str], rule: str, *, required: str = "required"
) -> list[FieldViolation]:
    """The problem of a name field, if any: missing or not matching ``pattern``.

    Args:
        field: The field's path.
        value: Its value.
        pattern: What a well-formed value matches.
        rule: The violation of a malformed value (the pattern in words).
        required: The violation of an empty value; "" when the field is optional.
    """
    if not value:
        return [FieldViolation(field, required)] if required else []
    if not pattern.match(value):
        return [FieldViolation(field, rule)]
    return []


def _capability_violations(
    field: str, value: str, *, required: str = "required"
) -> list[FieldViolation]:
    """The problem of a capability name, if any (see :func:`_name_violations`)."""
    return _name_violations(field, value, CAPABILITY_RE, _CAPABILITY_RULE, required=required)


def find_cycle(plan: coordinator_pb2.Plan) -> list[str]:
    """A dependency cycle of a plan as ``[a, b, ..., a]``, or ``[]`` when there is none.

    Self-dependencies and unknown dependencies are ignored (reported on their own).
    """
    # Self-dependencies are reported on their own; look for real cycles past them.
    graph = {step.step_id: [d for d in step.depends_on if d != step.step_id] for step in plan.steps}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    path: list[str] = []

    def visit(node: str) -> list[str]:
        color[node] = grey
        path.append(node)
        for nxt in graph.get(node, []):
            if nxt not in color:
                continue
            if color[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            if color[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        color[node] = black
        return []

    for node in graph:
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return []


def project_violations(name: str, goal: str, attributes: dict[str, str]) -> list[FieldViolation]:
    """Every problem of a new project's fields."""
    violations = []
    if not name:
        violations.append(FieldViolation("name", "required"))
    elif len(name) > _MAX_PROJECT_NAME:
        violations.append(FieldViolation("name", f"longer than {_MAX_PROJECT_NAME} characters"))
    if len(goal) > _MAX_PROJECT_GOAL:
        violations.append(FieldViolation("goal", f"longer than {_MAX_PROJECT_GOAL} characters"))
    if len(attributes) > _MAX_LABELS:
        violations.append(FieldViolation("attributes", f"more than {_MAX_LABELS} attributes"))
    for key, value in attributes.items():
        if not key or len(key) > _MAX_LABEL_KEY:
            violations.append(
                FieldViolation("attributes", f"keys must be 1-{_MAX_LABEL_KEY} characters")
            )
        if len(value) > _MAX_LABEL_VALUE:
            violations.append(
                FieldViolation(f"attributes[{key}]", f"longer than {_MAX_LABEL_VALUE}")
            )
    return violations
