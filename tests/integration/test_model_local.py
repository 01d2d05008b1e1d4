"""The local backend: Gemma 3 270M run in-process by llama-cpp-python, behind the
model service over mTLS. Slow (a real model), but part of ``make test``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hivewire.model.v1 import model_pb2
from hivewire.services.model.app import warm_up
from hivewire.services.model.backends.local import LocalBackend
from hivewire.services.model.settings import ModelSettings
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.model_harness import ModelHarness, serve_model

pytestmark = pytest.mark.slow


@pytest.fixture
async def harness(pki: Pki) -> AsyncIterator[ModelHarness]:
    pytest.importorskip("llama_cpp", reason="the local extra is not installed")
    # default_model "auto" resolves to the local model when the extra is installed.
    settings = ModelSettings(backends=["local"], local_threads=2)
    async with serve_model(pki, settings) as running:
        yield running


async def test_local_model_streams_a_chat(harness: ModelHarness) -> None:
    assert harness.service.router.default_model == "gemma-3-270m"
    backend = harness.service.backends["local"]
    assert isinstance(backend, LocalBackend)
    assert not backend.loaded
    await warm_up(harness.service)  # what __main__ does before serving
    assert backend.loaded
    chunks: list[str] = []
    completion = None
    async for item in harness.client.chat(
        [("system", "Answer briefly."), ("user", "What colour is the sky?")],
        max_tokens=10,
        temperature=0.0,
        seed=3,
    ):
        if isinstance(item, str):
            chunks.append(item)
        else:
            completion = item
    assert completion is not None
    assert chunks
    assert (completion.backend, completion.model) == ("local", "gemma-3-270m")
    assert completion.finish_reason in (
        model_pb2.FINISH_REASON_STOP,
        model_pb2.FINISH_REASON_LENGTH,
    )
    assert 0 < completion.usage.completion_tokens <= 10
    assert completion.usage.prompt_tokens > 0  # counted with the model's tokenizer


async def test_cancelling_stops_the_generation_thread(harness: ModelHarness) -> None:
    backend = harness.service.backends["local"]
    assert isinstance(backend, LocalBackend)
    before = backend.tokens_generated
    received = 0
    async for item in harness.client.chat(
        [("user", "Write a very long story about the sea.")], max_tokens=1000, temperature=0.8
    ):
        assert isinstance(item, str)
        received += 1
        if received == 3:
            break  # cancels the call; the service stops the model thread

    await eventually(lambda: backend.active_generations == 0, timeout=30)
    produced = backend.tokens_generated - before
    assert 3 <= produced < 1000


async def test_local_model_embeds(harness: ModelHarness) -> None:
    response = await harness.client.embed(["the sky is blue", "grass is green"])
    assert response.model == "gemma-3-270m"
    assert [len(e.values) for e in response.embeddings] == [640, 640]
    assert list(response.embeddings[0].values) != list(response.embeddings[1].values)
    assert response.usage.prompt_tokens > 0
