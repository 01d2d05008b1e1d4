"""The agent SDK's pure parts: capabilities, payloads, errors, conversions, loading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hivewire.agent.v1 import agent_pb2
from hivewire.services.agent import (
    Agent,
    Payload,
    PermanentError,
    RetryableError,
    capability,
    convert,
)
from hivewire.services.agent.examples.calculator import (
    evaluate_locally,
    free_variables,
    parse,
    substitute,
)
from hivewire.services.agent.examples.summarizer import split_sections
from hivewire.services.agent.runtime import classify
from hivewire.services.agent.sdk import TaskContext, Usage
from hivewire.services.agent.serve import AgentLoadError, load_agent, settings_for_agent
from hivewire.services.agent.settings import AgentProcessSettings
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.errors import InvalidArgument, Unavailable


class Two(Agent):
    """Two capabilities."""

    name = "two"

    @capability
    async def first_thing(self, task: Payload, ctx: TaskContext) -> str:
        """Does the first thing.

        More words.
        """
        return "1"

    @capability("second", description="Explicit.", input="in", output="out")
    async def other(self, task: Payload, ctx: TaskContext) -> str:
        return "2"


def test_capabilities_are_collected_in_order_with_defaults() -> None:
    caps = Two.capabilities()
    assert list(caps) == ["first-thing", "second"]
    assert caps["first-thing"].description == "Does the first thing."
    assert (caps["second"].description, caps["second"].input_description) == ("Explicit.", "in")
    card = Two().card(max_concurrency=9)
    assert (card.name, card.max_concurrency, card.description) == ("two", 9, "Two capabilities.")
    assert Two().handler("second") is not None and Two().handler("third") is None


def test_subclass_override_keeps_one_capability() -> None:
    class Child(Two):
        @capability("second", description="Overridden.")
        async def other(self, task: Payload, ctx: TaskContext) -> str:
            return "child"

    assert Child.capabilities()["second"].description == "Overridden."
    assert list(Child.capabilities()) == ["first-thing", "second"]
    assert Child.agent_name() == "two"


def test_capability_rejects_sync_handlers_bad_names_and_duplicates() -> None:
    with pytest.raises(TypeError, match="async def"):
        capability(lambda self, task, ctx: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid capability name"):

        @capability("Bad_Name")
        async def bad(self: object, task: Payload, ctx: TaskContext) -> None: ...

    with pytest.raises(ValueError, match="declared twice"):

        class Twice(Agent):
            @capability("same")
            async def a(self, task: Payload, ctx: TaskContext) -> None: ...

            @capability("same")
            async def b(self, task: Payload, ctx: TaskContext) -> None: ...


def test_payload_of_coerces_return_values() -> None:
    assert Payload.of("hi") == Payload(text="hi")
    assert Payload.of({"a": 1}).json == {"a": 1}
    assert Payload.of(b"\x00") == Payload(data=b"\x00", content_type="application/octet-stream")
    assert Payload.of(None).is_empty
    with pytest.raises(TypeError, match="cannot turn int"):
        Payload.of(3)  # type: ignore[arg-type]
    assert Payload(json={"b": 1, "a": 2}).as_text() == '{"a": 2, "b": 1}'
    assert Payload(data=b"caf\xc3\xa9", content_type="text/plain").as_text() == "café"


def test_payload_round_trips_through_proto() -> None:
    original = Payload(text="t", json={"k": [1, "x"]}, data=b"d", content_type="text/plain")
    back = convert.payload_from_proto(convert.payload_to_proto(original))
    assert back == Payload(text="t", json={"k": [1.0, "x"]}, data=b"d", content_type="text/plain")
    assert convert.payload_from_proto(convert.payload_to_proto(Payload())).json is None


def test_errors_need_upper_snake_reasons_and_classify() -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        PermanentError("bad reason")
    retry = classify(RetryableError("BUSY", "later", metadata={"k": "v"}))
    assert (retry.code, retry.reason, retry.retryable, dict(retry.metadata)) == (
        "UNAVAILABLE",
        "BUSY",
        True,
        {"k": "v"},
    )
    down = classify(Unavailable("down", reason="MODEL_UNAVAILABLE"))
    assert (down.code, down.reason, down.retryable) == ("UNAVAILABLE", "MODEL_UNAVAILABLE", True)
    other = classify(KeyError("x"))
    assert (other.reason, other.retryable, other.message) == (
        "HANDLER_FAILED",
        False,
        "KeyError: 'x'",
    )


def test_usage_accumulates_model_calls() -> None:
    usage = Usage()
    usage.add_model_call(Usage(prompt_tokens=3, completion_tokens=2, time_to_first_token=0.5))
    usage.add_model_call(Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))
    assert (usage.total_tokens, usage.model_calls, usage.time_to_first_token) == (7, 2, 0.5)
    back = convert.usage_from_proto(convert.usage_to_proto(usage))
    assert (back.prompt_tokens, back.completion_tokens, back.total_tokens) == (4, 3, 7)


def test_task_info_takes_the_earlier_deadline_and_validates() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assign = agent_pb2.TaskAssignment(task_id="t", capability="c", attempt=0)
    assign.deadline.FromDatetime(now + timedelta(seconds=60))
    info = convert.task_info_from_proto(assign, call_time_remaining=10, now=now)
    assert info.deadline == now + timedelta(seconds=10)
    assert info.attempt == 1
    info = convert.task_info_from_proto(assign, call_time_remaining=None, now=now)
    assert info.deadline == now + timedelta(seconds=60)
    assert (
        convert.task_info_from_proto(agent_pb2.TaskAssignment(task_id="t", capability="c")).deadline
        is None
    )
    with pytest.raises(InvalidArgument) as caught:
        convert.task_info_from_proto(agent_pb2.TaskAssignment())
    assert [v.field for v in caught.value.violations] == ["assign.task_id", "assign.capability"]


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(0, -1), (1, 1_000_000_000), (10**15, 0), (-(10**15), 0)]
)
def test_an_assignment_with_an_impossible_deadline_is_invalid(seconds: int, nanos: int) -> None:
    assign = agent_pb2.TaskAssignment(task_id="t", capability="c")
    assign.deadline.seconds, assign.deadline.nanos = seconds, nanos
    with pytest.raises(InvalidArgument) as caught:
        convert.task_info_from_proto(assign)
    assert [v.field for v in caught.value.violations] == ["assign.deadline"]


def test_calculator_expressions() -> None:
    assert evaluate_locally(parse("2 ^ 10 + sqrt(16)")) == 1028.0
    assert free_variables(parse("price * qty + max(price, pi)")) == ["price", "qty"]
    assert substitute(parse("price * qty"), {"price": 2.5, "qty": 3}) == "2.5 * 3"
    for bad, reason in (
        ("__import__('os')", "INVALID_EXPRESSION"),
        ("(1).real", "INVALID_EXPRESSION"),
        ("'a' * 3", "INVALID_EXPRESSION"),
        ("1 +", "INVALID_EXPRESSION"),
    ):
        with pytest.raises(PermanentError) as caught:
            parse(bad)
        assert caught.value.reason == reason
    with pytest.raises(PermanentError) as caught:
        evaluate_locally(parse("1 / 0"))
    assert caught.value.reason == "DIVISION_BY_ZERO"


def test_summarizer_sections_split_at_breaks() -> None:
    text = "\n\n".join(["word " * 300] * 5)
    sections = split_sections(text, size=2000)
    assert len(sections) >= 3
    assert all(len(s) <= 2000 for s in sections)
    assert " ".join(" ".join(sections).split()) == " ".join(text.split())
    assert split_sections("  short  ") == ["short"]


def test_load_agent_accepts_classes_instances_and_factories() -> None:
    calc = "hivewire.services.agent.examples.calculator"
    assert load_agent(f"{calc}:CalculatorAgent").agent_name() == "calculator"
    with pytest.raises(AgentLoadError, match="no attribute"):
        load_agent(f"{calc}:Nope")
    with pytest.raises(AgentLoadError, match="no capability"):
        load_agent("hivewire.services.agent.sdk:Agent")


def test_identity_defaults_to_the_agents_certificate(tmp_path: Path) -> None:
    (tmp_path / "agent-calculator.pem").write_text("x")
    agent = load_agent("hivewire.services.agent.examples.calculator:CalculatorAgent")
    settings = settings_for_agent(load_settings(AgentProcessSettings, certs_dir=tmp_path), agent)
    assert settings.identity == "agent-calculator"
    other = load_agent("hivewire.services.agent.examples.summarizer:SummarizerAgent")
    assert (
        settings_for_agent(load_settings(AgentProcessSettings, certs_dir=tmp_path), other).identity
        == "agent"
    )
    explicit = settings_for_agent(
        load_settings(AgentProcessSettings, certs_dir=tmp_path, identity="x"), agent
    )
    assert explicit.identity == "x"
