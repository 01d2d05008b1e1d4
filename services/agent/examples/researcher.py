"""The researcher example agent: gathers evidence with tools, then answers with the model.

Serve it with ``hivewire agent serve hivewire.services.agent.examples.researcher:ResearcherAgent``.

Input: a question as plain text, or JSON::

    {"question": "...", "documents": ["text", ...], "urls": ["https://..."],
     "data": {...}, "query": "JMESPath over data"}

Steps, each a progress step: ``http_fetch`` every URL (when the tool policy requires
approval of fetches, the task shows input-required until a person answers);
``json_query`` over ``data``; the ``text`` tool extracts the question's keywords and
then the sentences of every source that mention them; finally the model answers from
that evidence, streamed as the ``answer`` artifact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hivewire.services.agent import Agent, Payload, PermanentError, TaskContext, capability

SYSTEM = (
    "You are a careful research assistant. Answer the question using only the evidence "
    "given. Cite sources as [n]. If the evidence is not enough, say so."
)

MAX_SOURCE_CHARS = 50_000
"""Text of one source given to the extraction tool."""

MAX_EVIDENCE = 8
"""Sentences kept per source."""

_STOPWORDS = frozenset(
    "about after again also because been before being between both could does doing down "
    "during each from further have having here into itself just more most other over same "
    "should some such than that their them then there these they this those through under "
    "until very what when where which while whom will with would your".split()
)


@dataclass
class Source:
    """One piece of gathered material."""

    label: str
    text: str
    evidence: list[str]


class ResearcherAgent(Agent):
    """Answers questions from fetched pages, JSON data and documents, citing its evidence."""

    name = "researcher"
    version = "1.0.0"
    max_concurrency = 4
    labels = {"example": "true", "uses": "tools,model"}

    @capability(
        "research",
        description=(
            "Answer a question from sources: fetches URLs (http_fetch, approved by a person "
            "when the tool policy says so), "
            "queries JSON data (json_query), extracts relevant sentences (text), then asks "
            "the model."
        ),
        input=("A question as text, or JSON {question, documents[], urls[], data, query}."),
        output="The answer as text, with JSON {answer, keywords, sources[{label, evidence[]}]}.",
        input_schema={
            "type": "object",
            "properties": {
                "question": {"type": "string"},
                "documents": {"type": "array", "items": {"type": "string"}},
                "urls": {"type": "array", "items": {"type": "string"}},
                "data": {},
                "query": {"type": "string"},
                "model": {"type": "string"},
            },
            "required": ["question"],
        },
    )
    async def research(self, task: Payload, ctx: TaskContext) -> Payload:
        """Research the question."""
        request = _read_input(task)
        question: str = request["question"]
        sources: list[Source] = [
            Source(f"document {i}", text, []) for i, text in enumerate(request["documents"], 1)
        ]
        steps = 2 + len(request["urls"]) + (1 if request["data"] is not None else 0)
        done = 0

        async def step(name: str, message: str) -> None:
            nonlocal done
            await ctx.progress(min(0.9, done / (steps + 1)), name, message)
            done += 1

        for url in request["urls"]:
            await step("fetch", f"fetching {url}")
            page = await ctx.tools.invoke("http_fetch", {"url": url})
            sources.append(Source(url, page.text, []))
        if request["data"] is not None:
            await step("query", f"querying the data with {request['query']!r}")
            selected = await ctx.tools.invoke(
                "json_query", {"document": request["data"], "query": request["query"]}
            )
            sources.append(Source(f"data: {request['query']}", selected.text, []))

        await step("keywords", "finding the question's keywords")
        found = await ctx.tools.invoke(
            "text", {"text": question, "operation": "extract", "pattern": r"\w{4,}"}
        )
        keywords = _keywords(m["text"] for m in found.result.get("matches", []))
        ctx.logger.debug("keywords: %s", keywords)

        await step("extract", f"extracting evidence from {len(sources)} source(s)")
        for source in sources:
            source.evidence = await _evidence(ctx, source.text, keywords)

        await ctx.progress(0.9, "answer", "asking the model")
        stream = ctx.model.stream(
            _prompt(question, sources),
            system=SYSTEM,
            model=request["model"],
            temperature=0.1,
        )
        parts: list[str] = []
        async for chunk in stream:
            parts.append(chunk)
            await ctx.partial(chunk, artifact_id="answer", name="answer")
        await ctx.partial("", artifact_id="answer", name="answer", last_chunk=True)
        answer = "".join(parts).strip()
        await ctx.progress(1.0, "done", f"answered from {len(sources)} source(s)")
        return Payload(
            text=answer,
            json={
                "answer": answer,
                "keywords": keywords,
                "sources": [{"label": s.label, "evidence": s.evidence} for s in sources],
            },
        )


def _read_input(task: Payload) -> dict[str, Any]:
    data = dict(task.json or {})
    question = str(data.get("question") or task.text).strip()
    if not question:
        raise PermanentError("EMPTY_QUESTION", "there is no question to research")
    documents = data.get("documents") or []
    urls = data.get("urls") or []
    if not isinstance(documents, list) or not isinstance(urls, list):
        raise PermanentError("INVALID_INPUT", "documents and urls must be lists of strings")
    if data.get("data") is not None and not data.get("query"):
        raise PermanentError("INVALID_INPUT", "data needs a query (JMESPath)")
    return {
        "question": question,
        "documents": [str(d) for d in documents],
        "urls": [str(u) for u in urls],
        "data": data.get("data"),
        "query": str(data.get("query") or ""),
        "model": str(data.get("model") or ""),
    }


def _keywords(words: Any) -> list[str]:
    seen: dict[str, None] = {}
    for word in words:
        lowered = str(word).lower()
        if lowered not in _STOPWORDS:
            seen.setdefault(lowered, None)
    return list(seen)[:12]


async def _evidence(ctx: TaskContext, text: str, keywords: list[str]) -> list[str]:
    """Sentences of ``text`` mentioning a keyword, found by the tool service's ``text`` tool."""
    if not text.strip():
        return []
    if not keywords:
        return [text.strip()[:500]]
    alternatives = "|".join(re.escape(k) for k in keywords)
    pattern = rf"[^.!?\n]*\b(?:{alternatives})\b[^.!?\n]*[.!?]?"
    out = await ctx.tools.invoke(
        "text",
        {
            "text": text[:MAX_SOURCE_CHARS],
            "operation": "extract",
            "pattern": pattern,
            "ignore_case": True,
            "max_results": MAX_EVIDENCE,
        },
    )
    return [" ".join(m["text"].split()) for m in out.result.get("matches", []) if m["text"].strip()]


def _prompt(question: str, sources: list[Source]) -> str:
    lines = [f"Question: {question}", "", "Evidence:"]
    numbered = [s for s in sources if s.evidence]
    if not numbered:
        lines.append("(none found)")
    for index, source in enumerate(numbered, start=1):
        lines.append(f"[{index}] {source.label}:")
        lines.extend(f"  - {sentence}" for sentence in source.evidence)
    lines += ["", "Answer:"]
    return "\n".join(lines)
