"""``json_query``: query a JSON document with JMESPath (https://jmespath.org).

JMESPath is a complete, specified query language with implementations in many languages:
``people[?age > `30`].name``, ``sort_by(items, &price)[-1]``, ``length(orders)``,
``{names: people[*].name}``. The result is ``{"result": <value>}``, ``null`` when
nothing matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import jmespath
from jmespath import exceptions as jmespath_exceptions
from pydantic import Field

from hivewire.services.tool.sdk import ToolError, ToolOutput, tool

MAX_QUERY_CHARS = 1000


@tool(name="json_query")
def json_query(
    document: Any,
    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)],
) -> ToolOutput:
    """Query a JSON document with a JMESPath expression and return what it selects.

    Examples: "items[0].name", "people[?age > `30`].name", "length(orders)",
    "sort_by(items, &price)[-1].name", "{total: sum(orders[*].amount)}".

    Args:
        document: The JSON document (object, array or value) to query.
        query: The JMESPath expression.
    """
    # jmespath raises ArityError, a ParseError, at search time: that one is a failed query.
    with _refused(jmespath_exceptions.ParseError, "INVALID_QUERY", "invalid JMESPath query"):
        compiled = jmespath.compile(query)
    with _refused(jmespath_exceptions.JMESPathError, "QUERY_FAILED", "query failed"):
        value = compiled.search(document)
    return ToolOutput(result={"result": value}, text=json.dumps(value, ensure_ascii=False))


@contextmanager
def _refused(error: type[Exception], reason: str, what: str) -> Iterator[None]:
    """Turn ``error`` raised inside into the tool's INVALID_ARGUMENT ``reason``."""
    try:
        yield
    except error as exc:
        raise ToolError(f"{what}: {exc}", reason=reason, code="INVALID_ARGUMENT") from None
