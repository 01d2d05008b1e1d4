"""``text``: split, count and extract over a text, with regular expressions made safe.

Operations:

- ``split``: split on a pattern (or on whitespace without one); ``{"parts", "count"}``.
- ``count``: characters, words and lines, plus matches of the pattern if one is given.
- ``extract``: every match of the pattern, with its position and capture groups.

Patterns use the syntax of the ``regex`` module (a superset of Python's ``re``), or plain
text with ``literal: true``. Regular expressions are where text tools get dangerous (a
pattern like ``(a|aa)+$`` backtracks exponentially), so every run has a time limit
(``HIVEWIRE_TOOL__REGEX_TIMEOUT``, 1 s by default) enforced inside the regex engine,
which also releases the GIL while it works; patterns are limited to 500 characters, texts
to ``HIVEWIRE_TOOL__TEXT_MAX_CHARS`` and results to ``max_results`` items.
"""

# No ``from __future__ import annotations``: the tool's signature uses the settings'
# limits from the enclosing function, which string annotations could not resolve.
from typing import Annotated, Any, Literal

import regex
from pydantic import Field

from hivewire.services.tool.sdk import ToolDefinition, ToolError, ToolOutput, definition_of, tool
from hivewire.services.tool.settings import ToolSettings

MAX_PATTERN_CHARS = 500
MAX_RESULTS = 10_000


def _compile(pattern: str, *, literal: bool, ignore_case: bool) -> regex.Pattern[str]:
    flags = regex.IGNORECASE if ignore_case else 0
    try:
        return regex.compile(regex.escape(pattern) if literal else pattern, flags)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise ToolError(
            f"invalid pattern: {exc}", reason="INVALID_PATTERN", code="INVALID_ARGUMENT"
        ) from None


def _timeout_error(limit: float) -> ToolError:
    return ToolError(
        f"the pattern took longer than {limit:g}s on this text; simplify it",
        reason="REGEX_TIMEOUT",
        code="RESOURCE_EXHAUSTED",
    )


def make_text_tool(settings: ToolSettings) -> ToolDefinition:
    """Build the ``text`` tool with the limits of ``settings``."""
    limit = settings.regex_timeout
    max_chars = settings.text_max_chars

    @tool(name="text")
    def text_tool(
        text: Annotated[str, Field(max_length=max_chars)],
        operation: Literal["split", "count", "extract"],
        pattern: Annotated[str | None, Field(max_length=MAX_PATTERN_CHARS)] = None,
        literal: bool = False,
        ignore_case: bool = False,
        max_results: Annotated[int, Field(ge=1, le=MAX_RESULTS)] = 1000,
    ) -> ToolOutput:
        """Split a text, count what is in it, or extract the matches of a pattern.

        split: parts between matches of pattern (whitespace when no pattern).
        count: characters, words, lines, and matches of pattern when given.
        extract: every match of pattern with its offset and capture groups.

        Args:
            text: The text to work on.
            operation: One of split, count, extract.
            pattern: A regular expression (or plain text with literal=true); extract needs one.
            literal: Treat pattern as plain text rather than a regular expression.
            ignore_case: Match without regard to case.
            max_results: Most parts or matches to return.
        """
        compiled = (
            _compile(pattern, literal=literal, ignore_case=ignore_case)
            if pattern is not None
            else None
        )
        try:
            if operation == "split":
                return _split(text, compiled, max_results, limit)
            if operation == "count":
                return _count(text, compiled, limit)
            if compiled is None:
                raise ToolError(
                    "extract needs a pattern", reason="PATTERN_REQUIRED", code="INVALID_ARGUMENT"
                )
            return _extract(text, compiled, max_results, limit)
        except TimeoutError:
            raise _timeout_error(limit) from None

    definition = definition_of(text_tool)
    assert definition is not None
    return definition


def _split(
    text: str, compiled: regex.Pattern[str] | None, max_results: int, limit: float
) -> ToolOutput:
    if compiled is None:
        parts = text.split()
    else:
        parts = [
            part if isinstance(part, str) else ""
            for part in compiled.split(text, maxsplit=max_results, timeout=limit)
        ]
    truncated = len(parts) > max_results
    parts = parts[:max_results]
    result: dict[str, Any] = {"parts": parts, "count": len(parts), "truncated": truncated}
    return ToolOutput(result=result, text="\n".join(parts))


def _count(text: str, compiled: regex.Pattern[str] | None, limit: float) -> ToolOutput:
    result: dict[str, Any] = {
        "characters": len(text),
        "words": len(text.split()),
        "lines": len(text.splitlines()),
    }
    if compiled is not None:
        matches = 0
        for _ in compiled.finditer(text, timeout=limit):
            matches += 1
        result["matches"] = matches
    summary = ", ".join(f"{key}: {value}" for key, value in result.items())
    return ToolOutput(result=result, text=summary)


def _extract(text: str, compiled: regex.Pattern[str], max_results: int, limit: float) -> ToolOutput:
    matches: list[dict[str, Any]] = []
    truncated = False
    for match in compiled.finditer(text, timeout=limit):
        if len(matches) >= max_results:
            truncated = True
            break
        item: dict[str, Any] = {"text": match.group(0), "start": match.start()}
        if compiled.groups:
            item["groups"] = list(match.groups())
        if compiled.groupindex:
            item["named"] = match.groupdict()
        matches.append(item)
    result = {"matches": matches, "count": len(matches), "truncated": truncated}
    return ToolOutput(result=result, text="\n".join(m["text"] for m in matches))
