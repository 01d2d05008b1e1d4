"""Conversions that copy fields by name (runtime.convert.same_named): every field arrives.

The agent's usage and card, the model's usage and the tool audit's events name their
fields in a table instead of one keyword each; these tests pin that nothing is lost and
that reading back gives the same value.
"""

from __future__ import annotations

from hivewire.services.agent import convert as agent_convert
from hivewire.services.agent.sdk import AgentCardInfo, CapabilitySpec, Payload, Usage
from hivewire.services.model import convert as model_convert
from hivewire.services.model.domain import Usage as CallUsage
from hivewire.services.tool.audit import AuditedCall


def test_agent_usage_survives_the_round_trip() -> None:
    usage = Usage(
        prompt_tokens=3,
        completion_tokens=4,
        total_tokens=7,
        time_to_first_token=0.5,
        total_time=1.25,
        model_calls=2,
        tool_calls=1,
    )
    message = agent_convert.usage_to_proto(usage)
    assert (message.prompt_tokens, message.completion_tokens, message.total_tokens) == (3, 4, 7)
    assert (message.model_calls, message.tool_calls) == (2, 1)
    assert agent_convert.usage_from_proto(message) == usage


def test_agent_usage_without_a_total_reads_back_as_the_sum() -> None:
    message = agent_convert.usage_to_proto(Usage(prompt_tokens=5, completion_tokens=6))
    message.ClearField("total_tokens")
    assert agent_convert.usage_from_proto(message).total_tokens == 11


def test_the_agent_card_carries_every_field() -> None:
    schema = {"type": "object"}
    card = AgentCardInfo(
        name="echo",
        version="1.2.3",
        description="Repeats.",
        capabilities=(
            CapabilitySpec(
                name="echo",
                description="Repeats its input.",
                input_description="text",
                output_description="the same text",
                input_schema=schema,
            ),
        ),
        max_concurrency=3,
        labels={"uses": "nothing"},
    )
    message = agent_convert.card_to_proto(card)
    assert (message.name, message.version, message.description) == ("echo", "1.2.3", "Repeats.")
    assert message.max_concurrency == 3
    assert dict(message.labels) == {"uses": "nothing"}
    (cap,) = message.capabilities
    assert (cap.name, cap.description) == ("echo", "Repeats its input.")
    assert (cap.input_description, cap.output_description) == ("text", "the same text")
    assert cap.HasField("input_schema")
    assert not cap.HasField("output_schema")


def test_a_payload_keeps_an_empty_json_object_and_no_json_at_all() -> None:
    empty = agent_convert.payload_to_proto(Payload(json={}))
    assert empty.HasField("json")
    assert agent_convert.payload_from_proto(empty).json == {}
    none = agent_convert.payload_to_proto(Payload(text="hi"))
    assert not none.HasField("json")
    assert agent_convert.payload_from_proto(none) == Payload(text="hi")


def test_the_model_usage_carries_every_count() -> None:
    usage = CallUsage(
        prompt_tokens=2, completion_tokens=5, time_to_first_token=None, total_time=0.5
    )
    message = model_convert.usage_to_proto(usage, model_calls=1)
    assert (message.prompt_tokens, message.completion_tokens, message.total_tokens) == (2, 5, 7)
    assert message.model_calls == 1
    assert message.total_time.ToTimedelta().total_seconds() == 0.5
    assert not message.HasField("time_to_first_token")


def test_an_audited_call_names_the_call_in_its_events() -> None:
    data = AuditedCall(
        "c1", "json_query", "spiffe://hivewire.local/agent/x", "t1", "ab"
    ).event_data()
    assert (data.call_id, data.tool_name, data.caller) == (
        "c1",
        "json_query",
        "spiffe://hivewire.local/agent/x",
    )
    assert (data.task_id, data.arguments_digest) == ("t1", "ab")
    assert not data.outcome
    assert not data.HasField("duration")
