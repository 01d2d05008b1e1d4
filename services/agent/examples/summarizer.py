"""The summarizer example agent: summarizes text with the model service, streaming the summary.

Serve it with ``hivewire agent serve hivewire.services.agent.examples.summarizer:SummarizerAgent``.

Input: plain text, or JSON ``{"text": ..., "max_words": 80, "model": ""}``. Long texts
are summarized in sections first (one model call each, with progress), then the
section summaries are summarized into one; the final summary streams to the client
token by token as partial results of the ``summary`` artifact.
"""

from __future__ import annotations

from typing import Any

from hivewire.services.agent import Agent, Payload, PermanentError, TaskContext, capability

SYSTEM = (
    "You summarize texts faithfully and concisely. Answer with the summary only, "
    "in plain prose, without a preamble."
)

SECTION_CHARS = 6000
"""Texts longer than this are summarized section by section first."""

MAX_SECTIONS = 16
"""Sections beyond this many are cut (the summary says so)."""


def split_sections(text: str, size: int = SECTION_CHARS) -> list[str]:
    """Split a text into sections of at most ``size`` characters, at paragraph or word breaks.

    Args:
        text: The text.
        size: Largest section, in characters.

    Returns:
        The non-empty sections, in order.
    """
    sections: list[str] = []
    rest = text.strip()
    while len(rest) > size:
        cut = rest.rfind("\n\n", 0, size)
        if cut < size // 2:
            cut = rest.rfind(" ", 0, size)
        if cut <= 0:
            cut = size
        sections.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        sections.append(rest)
    return sections


class SummarizerAgent(Agent):
    """Summarizes texts with the model service, streaming the summary as it is written."""

    name = "summarizer"
    version = "1.0.0"
    max_concurrency = 8
    labels = {"example": "true", "uses": "model"}

    @capability(
        "summarize",
        description="Summarize a text; the summary streams as partial results.",
        input='Plain text, or JSON {"text": str, "max_words": int, "model": str}.',
        output="The summary as text, with JSON {words, sections, model, backend, finish_reason}.",
        input_schema={
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "max_words": {"type": "integer", "minimum": 5, "maximum": 1000},
                "model": {"type": "string"},
            },
            "required": ["text"],
        },
        output_schema={
            "type": "object",
            "properties": {
                "words": {"type": "integer"},
                "sections": {"type": "integer"},
                "model": {"type": "string"},
                "backend": {"type": "string"},
                "finish_reason": {"type": "string"},
            },
        },
    )
    async def summarize(self, task: Payload, ctx: TaskContext) -> Payload:
        """Summarize the input text."""
        text, max_words, model = _read_input(task)
        sections = split_sections(text)
        cut = len(sections) > MAX_SECTIONS
        sections = sections[:MAX_SECTIONS]
        await ctx.progress(
            0.05, "prepare", f"{len(text.split())} words in {len(sections)} section(s)"
        )
        if len(sections) > 1:
            notes = []
            for index, section in enumerate(sections, start=1):
                await ctx.progress(
                    0.05 + 0.6 * (index - 1) / len(sections),
                    "sections",
                    f"summarizing section {index} of {len(sections)}",
                )
                part = await ctx.model.generate(
                    _prompt(section, max(20, max_words // 2)),
                    system=SYSTEM,
                    model=model,
                    temperature=0.2,
                )
                notes.append(part.text.strip())
            source = "\n\n".join(notes)
            if cut:
                source += "\n\n(The text was longer; only its beginning was summarized.)"
        else:
            source = sections[0]
        await ctx.progress(0.7, "summarize", "writing the summary")
        stream = ctx.model.stream(
            _prompt(source, max_words),
            system=SYSTEM,
            model=model,
            temperature=0.2,
            max_tokens=max_words * 3,
        )
        parts: list[str] = []
        async for chunk in stream:
            parts.append(chunk)
            await ctx.partial(chunk, artifact_id="summary", name="summary")
        await ctx.partial("", artifact_id="summary", name="summary", last_chunk=True)
        assert stream.result is not None
        summary = "".join(parts).strip()
        await ctx.progress(1.0, "done", f"{len(summary.split())} words")
        return Payload(
            text=summary,
            json={
                "words": len(summary.split()),
                "sections": len(sections),
                "model": stream.result.model,
                "backend": stream.result.backend,
                "finish_reason": stream.result.finish_reason,
            },
        )


def _read_input(task: Payload) -> tuple[str, int, str]:
    data: dict[str, Any] = dict(task.json or {})
    text = str(data.get("text") or task.text) if task.json is not None else task.as_text()
    try:
        max_words = int(data.get("max_words", 80))
    except (TypeError, ValueError):
        raise PermanentError("INVALID_INPUT", "max_words must be a number") from None
    if not 5 <= max_words <= 1000:
        raise PermanentError("INVALID_INPUT", "max_words must be between 5 and 1000")
    if not text.strip():
        raise PermanentError("EMPTY_INPUT", "there is no text to summarize")
    return text, max_words, str(data.get("model", ""))


def _prompt(text: str, max_words: int) -> str:
    return (
        f"Summarize the following text in at most {max_words} words.\n\nText:\n{text}\n\nSummary:"
    )
