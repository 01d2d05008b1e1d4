"""The plugin SDK: schemas from type hints, binding, rendering, the arguments digest."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from hivewire.services.tool.sdk import (
    ToolCancelled,
    ToolContext,
    ToolOutput,
    arguments_digest,
    canonical_json,
    collect_tools,
    definition_of,
    normalize_json,
    tool,
    validation_violations,
)


class Item(BaseModel):
    name: str
    price: float


@tool(name="shop.order", requires_approval=True, timeout=5, approval_prompt="Buy {quantity}?")
async def order(
    items: list[Item],
    ctx: ToolContext,
    quantity: Annotated[int, Field(ge=1)] = 1,
    speed: Literal["slow", "fast"] = "slow",
) -> dict[str, float]:
    """Order items.

    Longer explanation that is not part of the summary.

    Args:
        items: What to buy,
            one entry per article.
        quantity: How many of each.

    Returns:
        The total.
    """
    return {"total": sum(i.price for i in items) * quantity}


@tool
def plain(text: str) -> int:
    """Count characters."""
    return len(text)


def test_schema_comes_from_type_hints_and_docstring() -> None:
    definition = definition_of(order)
    assert definition is not None
    assert definition.name == "shop.order"
    assert definition.description == "Order items."
    assert definition.requires_approval and definition.timeout == 5
    assert definition.is_async and definition.context_parameter == "ctx"
    schema = definition.input_schema
    assert schema["type"] == "object"
    assert schema["required"] == ["items"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"items", "quantity", "speed"}
    assert schema["properties"]["items"]["description"] == "What to buy, one entry per article."
    assert schema["properties"]["quantity"]["minimum"] == 1
    assert schema["properties"]["speed"]["enum"] == ["slow", "fast"]
    assert "$defs" in schema and "Item" in schema["$defs"]
    assert definition.output_schema is not None
    assert definition.output_schema["type"] == "object"


def test_non_object_results_are_wrapped() -> None:
    definition = definition_of(plain)
    assert definition is not None and not definition.is_async
    assert definition.output_schema == {
        "type": "object",
        "properties": {"result": {"type": "integer"}},
        "required": ["result"],
    }
    assert definition.render(5) == ({"result": 5}, "5")
    assert definition.render("é") == ({"result": "é"}, "é")


def test_bind_validates_and_converts() -> None:
    definition = definition_of(order)
    assert definition is not None
    kwargs = definition.bind({"items": [{"name": "a", "price": 2}], "quantity": 3.0})
    assert isinstance(kwargs["items"][0], Item)
    assert kwargs["quantity"] == 3 and isinstance(kwargs["quantity"], int)
    assert "ctx" not in kwargs
    with pytest.raises(ValidationError) as caught:
        definition.bind({"items": [{"name": "a"}], "quantity": 0, "extra": 1})
    paths = {path for path, _ in validation_violations(caught.value)}
    assert paths == {"items[0].price", "quantity", "extra"}


def test_render_tool_output_and_prompt() -> None:
    definition = definition_of(order)
    assert definition is not None
    assert definition.render(ToolOutput(result={"n": 2.0}, text="two")) == ({"n": 2}, "two")
    assert definition.render({"total": 4.5}) == ({"total": 4.5}, '{"total":4.5}')
    assert definition.prompt_for({"quantity": 3}) == "Buy 3?"
    # A template that does not fit the arguments falls back to the default question.
    assert definition.prompt_for({"items": []}).startswith("Allow shop.order with {")


def test_canonical_json_and_digest() -> None:
    args = {"b": [1.0, 2.5, "é"], "a": {"z": True, "y": None}}
    text = canonical_json(args)
    assert text == '{"a":{"y":null,"z":true},"b":[1,2.5,"é"]}'
    assert arguments_digest(args) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    # Struct turns every number into a double: both spellings give the same digest.
    assert arguments_digest({"n": 3}) == arguments_digest({"n": 3.0})
    assert arguments_digest({"n": 3}) != arguments_digest({"n": 3.5})


def test_normalize_rejects_non_json() -> None:
    with pytest.raises(ValueError):
        normalize_json({"x": float("nan")})
    with pytest.raises(ValueError):
        normalize_json({1: "x"})
    with pytest.raises(TypeError):
        normalize_json({"x": object()})
    assert normalize_json({"big": 2.0**60}) == {"big": 2.0**60}


def test_decorator_rejects_bad_signatures() -> None:
    with pytest.raises(ValueError):
        tool(name="bad name")(plain)

    def star(*args: int) -> int:
        return 0

    with pytest.raises(TypeError):
        tool(star)

    async def gen() -> object:
        yield 1

    with pytest.raises(TypeError):
        tool(gen)


def test_collect_tools_from_module_list_and_factory() -> None:
    import sys

    module = sys.modules[__name__]
    names = {d.name for d in collect_tools(module)}
    assert names == {"shop.order", "plain"}
    assert [d.name for d in collect_tools([plain])] == ["plain"]
    assert [d.name for d in collect_tools(lambda: [order])] == ["shop.order"]
    with pytest.raises(TypeError):
        collect_tools(42)


def test_context_progress_and_cancellation() -> None:
    seen: list[tuple[float, str, str]] = []
    ctx = ToolContext(tool_name="t", on_progress=lambda f, s, m: seen.append((f, s, m)))
    ctx.progress(1.5, "step", "msg")
    ctx.progress(-1, "", "")
    assert seen == [(1.0, "step", "msg"), (0.0, "", "")]
    ctx.check_cancelled()
    ctx.cancel()
    assert ctx.cancelled
    with pytest.raises(ToolCancelled):
        ctx.check_cancelled()
    ctx.progress(0.5)
    assert len(seen) == 2
    assert ctx.time_remaining() is None
