"""The example agents doing real work through the real model and tool services over mTLS.

The model service (deterministic backend) and the tool service run as real processes;
each example agent is served by the runtime on a real mTLS port and driven by a
coordinator-side AgentService client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from hivewire.common.v1 import common_pb2
from hivewire.services.agent.examples.calculator import CalculatorAgent
from hivewire.services.agent.examples.researcher import ResearcherAgent
from hivewire.services.agent.examples.summarizer import SECTION_CHARS, SummarizerAgent
from hivewire.services.agent.sdk import Agent
from hivewire.services.runtime.grants import ApprovalSigner
from tests.conftest import Pki
from tests.helpers import ServiceProcess, reserved_port
from tests.integration.test_agent_helpers import (
    Coordinator,
    Execute,
    agent_settings,
    assignment,
    serve_in_process,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAGE = (
    "Saturn has the most moons of any planet. Jupiter is the largest planet in the "
    "solar system. The weather on Mars is cold."
)
QUIET = {"HIVEWIRE_DISCOVERY": "static", "HIVEWIRE_EVENTS__ENABLED": "false"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web() -> AsyncIterator[str]:
    """A tiny HTTP server on 127.0.0.1 that http_fetch may reach."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        body = PAGE.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"127.0.0.1:{port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(
    pki: Pki, web: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """The real model (deterministic backend) and tool services, as processes."""
    workdir = tmp_path_factory.mktemp("agent-examples")
    policy = workdir / "tool-policy.toml"
    # The mesh's usual policy: agents may call every tool, fetching needs a person's yes.
    policy.write_text(
        '[[rules]]\ncallers = ["spiffe://hivewire.local/agent/*"]\nallow = ["*"]\n'
        'require_approval = ["http_fetch"]\n'
    )
    model = ServiceProcess(
        "hivewire.services.model",
        workdir=workdir,
        certs_dir=pki.dir,
        identity="model",
        env={**QUIET, "HIVEWIRE_MODEL__DEFAULT_BACKEND": "deterministic"},
    )
    tool = ServiceProcess(
        "hivewire.services.tool",
        workdir=workdir,
        certs_dir=pki.dir,
        identity="tool",
        env={
            **QUIET,
            # No NATS here: used approvals are remembered by this process (docs/tools.md).
            "HIVEWIRE_TOOL__GRANT_LEDGER": "process",
            "HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS": web,
            "HIVEWIRE_TOOL__POLICY_FILE": str(policy),
        },
    )
    async with model, tool:
        yield {"model": model.address, "tool": tool.address}


@contextlib.asynccontextmanager
async def example(
    pki: Pki, agent: Agent, services: dict[str, str], **overrides: Any
) -> AsyncIterator[Coordinator]:
    settings = agent_settings(
        pki.dir,
        identity=f"agent-{agent.agent_name()}",
        model_address=overrides.pop("model_address", services["model"]),
        tool_address=overrides.pop("tool_address", services["tool"]),
        **overrides,
    )
    async with serve_in_process(agent, settings) as running:
        client = Coordinator(f"127.0.0.1:{running.port}", pki.files("coordinator"))
        try:
            yield client
        finally:
            await client.close()


def of_kind(ex: Execute, kind: str) -> list[Any]:
    return [getattr(m, kind) for m in ex.received if m.WhichOneof("kind") == kind]


async def test_summarizer_streams_the_models_tokens(pki: Pki, services: dict[str, str]) -> None:
    text = "The mesh runs agents. " * 40
    async with example(pki, SummarizerAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("summarize", text=text))
        final = await ex.finish(timeout=30)

    assert final.WhichOneof("kind") == "result", final
    output = final.result.output
    assert output.text.startswith("Deterministic reply")
    # What the stream guarantees whatever the pace: the partials come before the result
    # and rebuild the summary in order. How many there are is not fixed: chunks queued
    # behind a busy stream travel as one (runtime/partials.py).
    kinds = ex.kinds()
    assert "partial" in kinds and kinds[-1] == "result", kinds
    partials = of_kind(ex, "partial")
    assert {p.artifact_id for p in partials} == {"summary"}
    assert partials[-1].last_chunk and not any(p.last_chunk for p in partials[:-1])
    assert "".join(p.content.text for p in partials).strip() == output.text
    assert output.json["backend"] == "deterministic"
    assert output.json["sections"] == 1 and output.json["finish_reason"] == "stop"
    usage = final.result.usage
    assert usage.model_calls == 1 and usage.completion_tokens > 0
    progress = of_kind(ex, "progress")
    assert [p.step for p in progress][0] == "prepare" and progress[-1].fraction == 1.0
    assert [a.done for a in of_kind(ex, "activity")] == [False, True]


async def test_without_coalescing_each_model_token_is_one_partial(
    pki: Pki, services: dict[str, str]
) -> None:
    text = "The mesh runs agents. " * 40
    async with example(pki, SummarizerAgent(), services, coalesce_partials=False) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("summarize", text=text))
        final = await ex.finish(timeout=30)

    assert final.WhichOneof("kind") == "result", final
    *tokens, end = of_kind(ex, "partial")
    # One message per token of the model (the deterministic backend's token is a word),
    # then the empty chunk that ends the artifact.
    assert len(tokens) == final.result.usage.completion_tokens > 2
    assert all(len(t.content.text.split()) == 1 for t in tokens), tokens
    assert end.last_chunk and end.content.text == ""
    assert "".join(t.content.text for t in tokens).strip() == final.result.output.text


async def test_summarizer_summarizes_long_texts_by_section(
    pki: Pki, services: dict[str, str]
) -> None:
    paragraph = "Agents talk to the coordinator over mutual TLS. " * 60
    text = "\n\n".join([paragraph] * (2 * SECTION_CHARS // len(paragraph) + 1))
    async with example(pki, SummarizerAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("summarize", json={"text": text, "max_words": 40}))
        final = await ex.finish(timeout=60)
    sections = final.result.output.json["sections"]
    assert sections >= 2
    assert final.result.usage.model_calls == sections + 1
    assert "sections" in [p.step for p in of_kind(ex, "progress")]


async def test_summarizer_rejects_empty_input(pki: Pki, services: dict[str, str]) -> None:
    async with example(pki, SummarizerAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("summarize", text="   "))
        error = (await ex.finish()).error.error
    assert (error.reason, error.retryable) == ("EMPTY_INPUT", False)


async def test_researcher_uses_tools_then_the_model(pki: Pki, services: dict[str, str]) -> None:
    request = {
        "question": "Which planet is the largest?",
        "documents": ["Jupiter is the largest planet. Mercury is the smallest planet."],
        "data": {"planets": [{"name": "Jupiter", "moons": 95}, {"name": "Mars", "moons": 2}]},
        "query": "planets[?moons > `10`].name",
    }
    async with example(pki, ResearcherAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("research", json=request))
        final = await ex.finish(timeout=30)

    assert final.WhichOneof("kind") == "result", final
    output = final.result.output.json
    assert output["answer"].startswith("Deterministic reply")
    assert {"planet", "largest"} <= set(output["keywords"])
    sources = {s["label"]: s["evidence"] for s in output["sources"]}
    assert sources["document 1"] == [
        "Jupiter is the largest planet.",
        "Mercury is the smallest planet.",
    ]
    assert "data: planets[?moons > `10`].name" in sources
    tools_called = [a.name for a in of_kind(ex, "activity") if a.done and a.kind == 2]
    assert tools_called == ["json_query", "text", "text", "text"]
    usage = final.result.usage
    assert (usage.tool_calls, usage.model_calls) == (4, 1)
    answer_chunks = [p for p in of_kind(ex, "partial") if p.artifact_id == "answer"]
    assert "".join(p.content.text for p in answer_chunks).strip() == output["answer"]


async def test_researcher_fetch_needs_approval(
    pki: Pki, services: dict[str, str], web: str
) -> None:
    url = f"http://{web}/planets.txt"
    async with example(pki, ResearcherAgent(), services) as coordinator:
        ex = coordinator.execute()
        assign = assignment(
            "research", json={"question": "Which planet has most moons?", "urls": [url]}
        )
        await ex.send(assign)
        asked = (await ex.until("input_required", timeout=30)).input_required
        assert asked.kind == common_pb2.INPUT_KIND_APPROVAL
        assert asked.tool_name == "http_fetch" and len(asked.arguments_digest) == 64
        assert url in asked.prompt
        # This test plays the coordinator, so it signs the grant as the coordinator would.
        grant = ApprovalSigner(pki.files("coordinator")).sign(
            task_id=assign.assign.task_id,
            tool_name=asked.tool_name,
            arguments_digest=asked.arguments_digest,
            request_id=asked.request_id,
            approved_by=pki.spiffe_id("client"),
        )
        await ex.answer(asked.request_id, approved=True, grant=grant)
        final = await ex.finish(timeout=30)

    assert final.WhichOneof("kind") == "result", final
    sources = {s["label"]: s["evidence"] for s in final.result.output.json["sources"]}
    # Sentences naming a keyword ("planet", "moons") are evidence; the one about Mars is not.
    assert sources[url] == [
        "Saturn has the most moons of any planet.",
        "Jupiter is the largest planet in the solar system.",
    ]


async def test_researcher_fetch_denied_fails_permanently(
    pki: Pki, services: dict[str, str], web: str
) -> None:
    async with example(pki, ResearcherAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(
            assignment("research", json={"question": "moons?", "urls": [f"http://{web}/x"]})
        )
        asked = (await ex.until("input_required", timeout=30)).input_required
        await ex.answer(asked.request_id, approved=False)
        error = (await ex.finish()).error.error
    assert (error.reason, error.retryable) == ("TOOL_APPROVAL_DENIED", False)


async def test_calculator_evaluates_with_the_calculator_tool(
    pki: Pki, services: dict[str, str]
) -> None:
    async with example(pki, CalculatorAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("calculate", text="2 + 3 * 4; sqrt(16)\n10 / 4"))
        final = await ex.finish(timeout=30)

    output = final.result.output
    assert output.json["engine"] == "tool"
    assert [r["value"] for r in output.json["results"]] == [14, 4.0, 2.5]
    assert output.text.splitlines() == ["2 + 3 * 4 = 14", "sqrt(16) = 4", "10 / 4 = 2.5"]
    progress = of_kind(ex, "progress")
    assert [p.step for p in progress] == ["plan", "evaluate", "evaluate", "evaluate"]
    assert [round(p.fraction, 3) for p in progress] == [0.0, 0.333, 0.667, 1.0]
    assert final.result.usage.tool_calls == 3 and final.result.usage.model_calls == 0


async def test_calculator_works_without_a_tool_service(pki: Pki, services: dict[str, str]) -> None:
    closed = f"127.0.0.1:{reserved_port()}"
    async with example(pki, CalculatorAgent(), services, tool_address=closed) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("calculate", json={"expressions": ["2 ** 10", "7 // 2"]}))
        final = await ex.finish(timeout=30)
    output = final.result.output.json
    assert output["engine"] == "local"
    assert [r["value"] for r in output["results"]] == [1024, 3]


async def test_calculator_tool_errors_are_permanent(pki: Pki, services: dict[str, str]) -> None:
    async with example(pki, CalculatorAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(assignment("calculate", text="1 / 0"))
        error = (await ex.finish(timeout=30)).error.error
    assert (error.reason, error.retryable) == ("DIVISION_BY_ZERO", False)


async def test_calculator_solve_asks_for_missing_values(pki: Pki, services: dict[str, str]) -> None:
    async with example(pki, CalculatorAgent(), services) as coordinator:
        ex = coordinator.execute()
        await ex.send(
            assignment("solve", json={"expression": "price * qty", "variables": {"qty": 3}})
        )
        asked = (await ex.until("input_required", timeout=30)).input_required
        assert asked.kind == common_pb2.INPUT_KIND_TEXT
        assert "price" in asked.prompt and asked.schema["type"] == "number"
        await ex.answer(asked.request_id, text="2.5")
        final = await ex.finish(timeout=30)

    output = final.result.output
    assert output.json["value"] == 7.5
    assert output.json["variables"] == {"qty": 3, "price": 2.5}
    assert output.text == "price * qty = 7.5"


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_example_cards_are_complete() -> None:
    for agent, names in (
        (SummarizerAgent(), ["summarize"]),
        (ResearcherAgent(), ["research"]),
        (CalculatorAgent(), ["calculate", "solve"]),
    ):
        card = agent.card()
        assert card.capability_names == names
        assert all(c.description and c.input_description for c in card.capabilities)
        assert card.version == "1.0.0"


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_example_certificates_exist(pki: Pki) -> None:
    for name in ("summarizer", "researcher", "calculator"):
        assert Path(pki.dir / f"agent-{name}.pem").exists()
        assert pki.spiffe_id(f"agent-{name}") == f"spiffe://hivewire.local/agent/{name}"
