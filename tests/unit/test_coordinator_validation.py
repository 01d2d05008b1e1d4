"""The field violations of bad task specs and plans: one per problem, worded exactly."""

from __future__ import annotations

import pytest

from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.coordinator.validation import plan_violations, validate_spec
from hivewire.services.runtime.errors import InvalidArgument

CAPABILITY_RULE = "must be lower-case letters, digits and dashes (at most 63 characters)"
STEP_ID_RULE = "must be letters, digits, '_', '.' and '-' (at most 63 characters)"


def test_every_name_problem_of_a_plan_is_one_violation() -> None:
    plan = C.Plan(
        steps=[
            C.PlanStep(step_id="", capability=""),
            C.PlanStep(step_id="a!", capability="Bad", compensation_capability="X y"),
            C.PlanStep(step_id="ok", capability="fine", compensation_capability="undo"),
            C.PlanStep(step_id="ok", capability="fine"),
        ],
        aggregation=C.AGGREGATION_AGGREGATOR,
        aggregator_capability="No",
    )
    found = [
        (v.field, v.description)
        for v in plan_violations(plan, CoordinatorSettings(), field_prefix="spec.plan")
    ]
    assert found == [
        ("spec.plan.steps[0].step_id", "required"),
        ("spec.plan.steps[0].capability", "required"),
        ("spec.plan.steps[1].step_id", STEP_ID_RULE),
        ("spec.plan.steps[1].capability", CAPABILITY_RULE),
        ("spec.plan.steps[1].compensation_capability", CAPABILITY_RULE),
        ("spec.plan.steps[3].step_id", "duplicate step id 'ok' (also steps[2])"),
        ("spec.plan.aggregator_capability", CAPABILITY_RULE),
    ]


def test_a_valid_plan_has_no_violation() -> None:
    plan = C.Plan(
        steps=[
            C.PlanStep(step_id="a.1", capability="echo", compensation_capability="undo-echo"),
            C.PlanStep(step_id="B_2", capability="echo", depends_on=["a.1"]),
        ],
        aggregation=C.AGGREGATION_AGGREGATOR,
        aggregator_capability="merge",
    )
    assert plan_violations(plan, CoordinatorSettings(), field_prefix="spec.plan") == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (C.TaskSpec(), [("spec.capability", "required")]),
        (C.TaskSpec(capability="Up"), [("spec.capability", CAPABILITY_RULE)]),
        (
            C.TaskSpec(
                capability="x", plan=C.Plan(steps=[C.PlanStep(step_id="a", capability="b")])
            ),
            [("spec.capability", "must be empty when a plan is given")],
        ),
        (
            C.TaskSpec(
                plan=C.Plan(
                    steps=[C.PlanStep(step_id="a", capability="b")],
                    aggregation=C.AGGREGATION_AGGREGATOR,
                )
            ),
            [("spec.plan.aggregator_capability", "required for AGGREGATION_AGGREGATOR")],
        ),
    ],
)
def test_a_bad_spec_is_refused_with_its_violations(
    spec: C.TaskSpec, expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_spec(spec, CoordinatorSettings())
    assert [(v.field, v.description) for v in info.value.violations] == expected
