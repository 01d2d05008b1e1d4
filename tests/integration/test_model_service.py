"""The model service over real mTLS gRPC against a stand-in Ollama server (real HTTP).

Covers streaming chat/generate with usage, embeddings, listing, error mapping,
a backend that dies mid-stream, cancellation reaching the backend's HTTP request,
token budgets, the circuit breaker and the deterministic backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from hivewire.model.v1 import model_pb2
from hivewire.services.model.metrics import model_label
from hivewire.services.model.settings import ModelSettings
from hivewire.services.runtime import errors
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.breaker import CircuitState
from hivewire.services.runtime.status import from_rpc_error
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.model_harness import ModelHarness, serve_model
from tests.support.ollama_standin import DEFAULT_REPLY, OllamaStandin


@pytest.fixture
async def ollama() -> AsyncIterator[OllamaStandin]:
    async with OllamaStandin(
        models={"llama3:8b": DEFAULT_REPLY, "nomic-embed": "unused"}
    ) as server:
        yield server


def settings_for(ollama: OllamaStandin, **overrides: Any) -> ModelSettings:
    values: dict[str, Any] = {
        "routes": {"llama3:8b": "ollama", "nomic-embed": "ollama", "missing:1b": "ollama"},
        "default_model": "llama3:8b",
        "default_embedding_model": "nomic-embed",
        "backends": ["ollama", "deterministic"],
        "ollama_url": ollama.url,
        "retry_after": 1.5,
    }
    values.update(overrides)
    return ModelSettings(**values)


@pytest.fixture
async def harness(pki: Pki, ollama: OllamaStandin) -> AsyncIterator[ModelHarness]:
    async with serve_model(pki, settings_for(ollama)) as running:
        yield running


async def collect(stream: Any) -> tuple[list[str], model_pb2.Completion]:
    chunks: list[str] = []
    completion = None
    async for item in stream:
        if isinstance(item, str):
            chunks.append(item)
        else:
            completion = item
    assert completion is not None, "the stream ended without a Completion"
    return chunks, completion


async def error_of(stream: Any) -> errors.HivewireError:
    with pytest.raises(errors.HivewireError) as caught:
        await collect(stream)
    return caught.value


def sample(name: str, **labels: str) -> float:
    if "model" in labels:
        # The label the service gives this name: earlier tests in the same process may
        # have used up the distinct model labels, and then it is ``_other``.
        labels["model"] = model_label(labels["model"])
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- streaming --------------------------------------------------------------------------


async def test_chat_streams_tokens_and_reports_backend_usage(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    before_out = sample(
        "hivewire_model_completion_tokens_total", model="llama3:8b", backend="ollama"
    )
    stream = harness.client.chat(
        [("system", "Be brief."), ("user", "Why is the sky blue?")],
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
        task_id="task-1",
    )
    chunks, done = await collect(stream)

    assert "".join(chunks) == DEFAULT_REPLY
    assert len(chunks) == len(DEFAULT_REPLY.split())
    assert done.finish_reason == model_pb2.FINISH_REASON_STOP
    assert (done.backend, done.model) == ("ollama", "llama3:8b")
    # The final NDJSON frame's counts, not an estimate.
    assert done.usage.prompt_tokens == len("Be brief. Why is the sky blue?".split())
    assert done.usage.completion_tokens == len(chunks)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.usage.HasField("time_to_first_token")
    assert done.usage.model_calls == 1

    sent = ollama.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/api/chat")
    assert sent.body["stream"] is True
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert sent.body["options"] == {"temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "seed": 7}
    after_out = sample(
        "hivewire_model_completion_tokens_total", model="llama3:8b", backend="ollama"
    )
    assert after_out - before_out == len(chunks)
    assert harness.events.types() == ["model.request_started", "model.request_completed"]
    completed = harness.events.events[-1].data
    assert (completed.task_id, completed.operation, completed.backend) == (
        "task-1",
        "chat",
        "ollama",
    )
    assert completed.usage.completion_tokens == len(chunks)


async def test_stream_messages_are_numbered_and_end_with_done(harness: ModelHarness) -> None:
    request = model_pb2.ChatRequest(
        messages=[model_pb2.ChatMessage(role=model_pb2.CHAT_ROLE_USER, content="hi")]
    )
    responses = [r async for r in harness.stub.Chat(request, timeout=10)]
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert [r.WhichOneof("kind") for r in responses[:-1]] == ["chunk"] * (len(responses) - 1)
    assert responses[-1].WhichOneof("kind") == "done"


async def test_generate_uses_the_native_generate_endpoint(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    chunks, done = await collect(
        harness.client.generate("Why is the sky blue?", system="Answer in one line.", max_tokens=4)
    )
    assert "".join(chunks) == " ".join(DEFAULT_REPLY.split()[:4])
    assert done.finish_reason == model_pb2.FINISH_REASON_LENGTH
    sent = ollama.requests[-1]
    assert sent.path == "/api/generate"
    assert sent.body["prompt"] == "Why is the sky blue?"
    assert sent.body["system"] == "Answer in one line."
    assert sent.body["options"] == {"num_predict": 4}


async def test_embed_and_list_models(harness: ModelHarness, ollama: OllamaStandin) -> None:
    response = await harness.client.embed(["first text", "second text"], task_id="t-2")
    assert len(response.embeddings) == 2
    assert all(len(e.values) == ollama.embedding_dimensions for e in response.embeddings)
    assert response.embeddings[0].values != response.embeddings[1].values
    assert response.model == "nomic-embed"
    assert response.usage.prompt_tokens == 4
    assert ollama.requests[-1].body == {
        "model": "nomic-embed",
        "input": ["first text", "second text"],
    }

    listing = await harness.client.list_models()
    names = {(m.backend, m.name) for m in listing.models}
    assert ("ollama", "llama3:8b") in names
    assert ("deterministic", "deterministic") in names
    default = [m for m in listing.models if m.is_default]
    assert [(m.backend, m.name) for m in default] == [("ollama", "llama3:8b")]
    llama = next(m for m in listing.models if m.name == "llama3:8b")
    assert llama.size_bytes == 3825819519
    assert llama.modified_at.ToDatetime().year == 2024
    assert {b.backend: b.available for b in listing.backends} == {
        "ollama": True,
        "deterministic": True,
    }

    only = await harness.client.list_models("deterministic")
    assert {m.backend for m in only.models} == {"deterministic"}
    with pytest.raises(errors.NotFound) as caught:
        await harness.client.list_models("nope")
    assert caught.value.reason == "BACKEND_NOT_FOUND"


# -- errors -------------------------------------------------------------------------------


async def test_unknown_model_is_not_found(harness: ModelHarness, ollama: OllamaStandin) -> None:
    err = await error_of(harness.client.chat([("user", "hi")], model="gpt-9"))
    assert isinstance(err, errors.NotFound)
    assert err.reason == "MODEL_NOT_FOUND"
    assert (err.resource_type, err.resource_name) == ("model", "gpt-9")

    # Routed to Ollama, which does not have it: Ollama's 404 body travels in the details.
    err = await error_of(harness.client.chat([("user", "hi")], model="missing:1b"))
    assert isinstance(err, errors.NotFound)
    assert err.reason == "MODEL_NOT_FOUND"
    assert err.metadata["http_status"] == "404"
    assert "not found, try pulling it first" in err.metadata["body"]


async def test_bad_parameters_are_invalid_argument_with_field_violations(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    request = model_pb2.ChatRequest(
        messages=[model_pb2.ChatMessage(content="no role")],
        params=model_pb2.GenerationParams(temperature=2.5, top_p=0.0, max_tokens=10**6),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in harness.stub.Chat(request, timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(caught.value)
    assert isinstance(err, errors.InvalidArgument)
    assert {v.field for v in err.violations} == {
        "messages[0].role",
        "params.temperature",
        "params.top_p",
        "params.max_tokens",
    }

    err = await error_of(harness.client.chat([]))
    assert isinstance(err, errors.InvalidArgument)
    assert [v.field for v in err.violations] == ["messages"]

    err = await error_of(harness.client.generate("  "))
    assert isinstance(err, errors.InvalidArgument)
    assert [v.field for v in err.violations] == ["prompt"]

    with pytest.raises(errors.InvalidArgument) as bad_embed:
        await harness.client.embed(["ok", ""])
    assert [v.field for v in bad_embed.value.violations] == ["inputs[1]"]

    # A malformed budget header is the caller's mistake too.
    call = harness.stub.Chat(
        model_pb2.ChatRequest(messages=[model_pb2.ChatMessage(role=2, content="hi")]),
        metadata=[(md.TOKEN_BUDGET, "lots")],
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as header:
        async for _ in call:
            pass
    assert header.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ollama.requests == []  # nothing invalid reached the backend


async def test_backend_error_bodies_are_summarised_in_the_status(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    ollama.fail_with = (500, '{"error": "llama runner process has terminated: CUDA out of memory"}')
    err = await error_of(harness.client.chat([("user", "hi")]))
    assert isinstance(err, errors.Unavailable)
    assert err.reason == "MODEL_BACKEND_UNAVAILABLE"
    assert err.retry_after == pytest.approx(1.5)
    assert err.metadata["http_status"] == "500"
    assert err.metadata["body"] == "llama runner process has terminated: CUDA out of memory"
    assert err.metadata["backend"] == "ollama"

    ollama.fail_with = (400, '{"error": "invalid options: num_ctx must be positive"}')
    err = await error_of(harness.client.chat([("user", "hi")]))
    assert isinstance(err, errors.InvalidArgument)
    assert err.reason == "MODEL_BACKEND_REJECTED"
    assert "num_ctx must be positive" in err.violations[0].description

    ollama.fail_with = (429, "slow down")
    err = await error_of(harness.client.chat([("user", "hi")]))
    assert isinstance(err, errors.ResourceExhausted)
    assert err.reason == "MODEL_BACKEND_RATE_LIMITED"
    assert err.metadata["body"] == "slow down"


async def test_backend_down_is_unavailable_with_retry_info(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    await ollama.stop()
    err = await error_of(harness.client.chat([("user", "hi")]))
    assert isinstance(err, errors.Unavailable)
    assert err.reason == "MODEL_BACKEND_UNAVAILABLE"
    assert err.retry_after == pytest.approx(1.5)
    assert err.metadata["backend"] == "ollama"
    assert harness.events.types()[-1] == "model.failed"
    assert harness.events.events[-1].data.error.reason == "MODEL_BACKEND_UNAVAILABLE"

    listing = await harness.client.list_models()
    state = {b.backend: b for b in listing.backends}["ollama"]
    assert not state.available
    assert state.error.code == "UNAVAILABLE"
    assert state.error.retryable


async def test_backend_dying_mid_stream_fails_the_call_after_the_tokens_it_sent(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    ollama.die_after = 3
    chunks: list[str] = []
    with pytest.raises(errors.Unavailable) as caught:
        async for item in harness.client.chat([("user", "hi")]):
            assert isinstance(item, str), "no Completion may follow a broken stream"
            chunks.append(item)
    assert chunks == [w if i == 0 else " " + w for i, w in enumerate(DEFAULT_REPLY.split()[:3])]
    assert caught.value.reason == "MODEL_BACKEND_UNAVAILABLE"

    ollama.die_after = None
    ollama.error_frame_after = 2
    with pytest.raises(errors.Unavailable) as frame_error:
        await collect(harness.client.chat([("user", "hi")]))
    assert "error was encountered while running the model" in frame_error.value.message


async def test_cancelling_mid_stream_closes_the_backend_request(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    ollama.hang_after = 2
    stream = harness.client.chat([("user", "tell me everything")], task_id="t-cancel")
    received = []
    async for item in stream:
        received.append(item)
        if len(received) == 2:
            break  # leaving the loop cancels the gRPC call
    assert len(received) == 2
    # The stand-in holds the HTTP response open until the service hangs up on it.
    await asyncio.wait_for(ollama.client_closed.wait(), timeout=10)

    def settled() -> None:
        assert harness.events.types()[-1] == "model.failed"
        assert sample("hivewire_model_inflight_requests", backend="ollama") == 0

    await eventually(settled)
    failed = harness.events.events[-1].data
    assert (failed.error.code, failed.task_id) == ("CANCELLED", "t-cancel")
    # A cancel is not a backend failure.
    assert harness.service.breakers["ollama"].consecutive_failures == 0


async def test_the_callers_deadline_bounds_the_backend_call(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    ollama.hang_after = 1
    err = await error_of(harness.client.chat([("user", "hi")], timeout=1.0))
    assert isinstance(err, errors.DeadlineExceeded)
    # The service gave up on the backend request too, instead of leaving it running.
    await asyncio.wait_for(ollama.client_closed.wait(), timeout=10)


# -- budgets -----------------------------------------------------------------------------


async def test_request_over_the_token_budget_is_refused(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    err = await error_of(
        harness.client.chat([("user", "x" * 40)], max_tokens=100, token_budget=50, task_id="t-9")
    )
    assert isinstance(err, errors.ResourceExhausted)
    assert err.reason == "TOKEN_BUDGET_EXCEEDED"
    assert err.quota_violations[0].subject == "task:t-9"
    assert err.metadata["remaining_tokens"] == "50"
    # ~10 prompt tokens + 4 per message: prompt alone fits, with max_tokens it does not.
    assert err.metadata["prompt_tokens_estimate"] == "14"

    err = await error_of(harness.client.chat([("user", "x" * 400)], token_budget=50))
    assert isinstance(err, errors.ResourceExhausted)
    assert ollama.requests == []

    chunks, done = await collect(
        harness.client.chat([("user", "x" * 40)], max_tokens=36, token_budget=50)
    )
    assert done.finish_reason == model_pb2.FINISH_REASON_STOP  # 14 + 36 <= 50: allowed


async def test_stream_stops_with_finish_budget_when_the_budget_is_reached(
    harness: ModelHarness, ollama: OllamaStandin
) -> None:
    # Prompt estimate 14; a budget of 17 leaves 3 completion tokens.
    chunks, done = await collect(harness.client.chat([("user", "x" * 40)], token_budget=17))
    assert ollama.requests[-1].body["options"] == {"num_predict": 3}
    assert len(chunks) == 3
    assert done.finish_reason == model_pb2.FINISH_REASON_BUDGET
    assert done.usage.completion_tokens == 3

    # A backend that ignores the cap is cut off by the service itself.
    ollama.honor_num_predict = False
    chunks, done = await collect(harness.client.chat([("user", "x" * 40)], token_budget=17))
    assert len(chunks) == 3
    assert done.finish_reason == model_pb2.FINISH_REASON_BUDGET
    assert done.usage.completion_tokens == 3


# -- circuit breaker -----------------------------------------------------------------------


async def test_circuit_opens_after_repeated_failures_and_recovers_through_one_probe(
    pki: Pki, ollama: OllamaStandin
) -> None:
    settings = settings_for(ollama, breaker_failure_threshold=2, breaker_reset_timeout=0.3)
    async with serve_model(pki, settings) as harness:
        breaker = harness.service.breakers["ollama"]
        await ollama.stop()
        for _ in range(2):
            err = await error_of(harness.client.chat([("user", "hi")]))
            assert err.reason == "MODEL_BACKEND_UNAVAILABLE"
        assert breaker.state is CircuitState.OPEN
        assert sample("hivewire_model_circuit_state", backend="ollama") == CircuitState.OPEN.value

        await ollama.start()  # back up, but the circuit is still open: no call gets through
        seen = len(ollama.requests)
        err = await error_of(harness.client.chat([("user", "hi")]))
        assert isinstance(err, errors.Unavailable)
        assert err.reason == "MODEL_BACKEND_CIRCUIT_OPEN"
        assert err.retry_after is not None
        assert len(ollama.requests) == seen
        listing = await harness.client.list_models("ollama")
        assert listing.backends[0].circuit_open

        await eventually(lambda: breaker.state is CircuitState.HALF_OPEN, timeout=10)
        # One probe: while it is in flight every other call is still refused.
        ollama.hang_after = 1
        probe = harness.client.chat([("user", "probe")])
        probe_items = aiter(probe)  # keep it: a collected iterator cancels its call
        first = await anext(probe_items)
        assert isinstance(first, str)
        err = await error_of(harness.client.chat([("user", "hi")]))
        assert err.reason == "MODEL_BACKEND_CIRCUIT_OPEN"
        probe.cancel()
        await asyncio.wait_for(ollama.client_closed.wait(), timeout=10)
        # The cancelled probe gave no verdict; the next caller probes and succeeds.
        ollama.hang_after = None

        async def recovered() -> None:
            chunks, done = await collect(harness.client.chat([("user", "hi")]))
            assert done.finish_reason == model_pb2.FINISH_REASON_STOP

        await eventually(recovered, retry_on=(AssertionError, errors.Unavailable))
        assert breaker.state is CircuitState.CLOSED
        assert sample("hivewire_model_circuit_state", backend="ollama") == CircuitState.CLOSED.value


async def test_client_errors_do_not_count_against_the_backend(
    pki: Pki, ollama: OllamaStandin
) -> None:
    settings = settings_for(ollama, breaker_failure_threshold=1)
    async with serve_model(pki, settings) as harness:
        for _ in range(3):
            err = await error_of(harness.client.chat([("user", "hi")], model="missing:1b"))
            assert isinstance(err, errors.NotFound)
        assert harness.service.breakers["ollama"].state is CircuitState.CLOSED


# -- deterministic backend ---------------------------------------------------------------------


async def test_deterministic_backend_is_reproducible(harness: ModelHarness) -> None:
    messages = [("user", "Summarise the plan")]
    first, done = await collect(harness.client.chat(messages, model="deterministic", seed=1))
    again, _ = await collect(harness.client.chat(messages, model="deterministic", seed=1))
    other, _ = await collect(harness.client.chat(messages, model="deterministic", seed=2))
    assert first == again
    assert "".join(first) != "".join(other)
    assert "".join(first).endswith("to: Summarise the plan")
    assert done.backend == "deterministic"

    limited, done = await collect(
        harness.client.chat(messages, model="deterministic", max_tokens=2)
    )
    assert len(limited) == 2
    assert done.finish_reason == model_pb2.FINISH_REASON_LENGTH

    a = await harness.client.embed(["the sky is blue"], model="deterministic")
    b = await harness.client.embed(["the sky is blue"], model="deterministic")
    assert list(a.embeddings[0].values) == list(b.embeddings[0].values)
    assert len(a.embeddings[0].values) == 64
