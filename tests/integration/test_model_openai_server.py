"""The OpenAI-compatible backend against a real server: llama-cpp-python's
``python -m llama_cpp.server`` serving Gemma 3 270M on a loopback port.

Slow (a real model generates the tokens), but part of ``make test``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hivewire.model.v1 import model_pb2
from hivewire.services.model.backends.local import bundled_model_path
from hivewire.services.model.settings import ModelSettings
from hivewire.services.runtime import errors
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.model_harness import serve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` with the bundled model; yields its ``/v1`` URL."""
    pytest.importorskip("llama_cpp.server", reason="the local extra is not installed")
    model = bundled_model_path()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--chat_format",
                "gemma",
                "--n_ctx",
                "2048",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    bases: list[str] = []

    async def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{_tail(log)}")
        if not bases:
            # Port 0: uvicorn logs the port it bound.
            bound = _BOUND.search(log.read_text(errors="replace"))
            if bound is None:
                return False
            bases.append(f"{bound[1]}/v1")
        base = bases[0]
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{base}/models", timeout=2)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    try:
        asyncio.run(eventually(ready, timeout=120, interval=0.2))
        yield bases[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_BOUND = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def settings_for(url: str) -> ModelSettings:
    return ModelSettings(
        backends=["openai"],
        openai_url=url,
        routes={"gemma": "openai/gemma-3-270m"},
        default_model="gemma",
        # A key the server does not check: sent as a bearer token all the same.
        openai_api_key="sk-test",
    )


async def test_chat_streams_from_a_real_openai_compatible_server(
    pki: Pki, llama_server: str
) -> None:
    async with serve_model(pki, settings_for(llama_server)) as harness:
        chunks: list[str] = []
        completion = None
        async for item in harness.client.chat(
            [("user", "Name three colours.")], max_tokens=12, temperature=0.0, seed=1
        ):
            if isinstance(item, str):
                chunks.append(item)
            else:
                completion = item
        assert completion is not None
        assert chunks and "".join(chunks).strip()
        assert completion.backend == "openai"
        assert completion.finish_reason in (
            model_pb2.FINISH_REASON_STOP,
            model_pb2.FINISH_REASON_LENGTH,
        )
        # The server sends no usage chunk: the service counts the streamed tokens.
        assert 0 < completion.usage.completion_tokens <= 12
        assert completion.usage.prompt_tokens > 0
        assert completion.usage.HasField("time_to_first_token")

        text = await harness.client.generate(
            "The capital of France is", max_tokens=5, temperature=0.0
        ).text()
        assert text.strip()

        listing = await harness.client.list_models()
        assert [b.available for b in listing.backends] == [True]
        assert any(m.name.endswith(".gguf") and m.backend == "openai" for m in listing.models)


async def test_budget_stops_a_real_stream(pki: Pki, llama_server: str) -> None:
    async with serve_model(pki, settings_for(llama_server)) as harness:
        stream = harness.client.chat(
            [("user", "Count from one to one hundred.")], temperature=0.0, token_budget=16
        )
        text = await stream.text()
        assert stream.completion is not None
        assert stream.completion.finish_reason == model_pb2.FINISH_REASON_BUDGET
        # Prompt estimate: 8 (30 characters) + 4; 4 tokens were left to generate.
        assert stream.completion.usage.completion_tokens <= 4
        assert text

        with pytest.raises(errors.ResourceExhausted):
            await harness.client.chat([("user", "hi")], max_tokens=50, token_budget=16).text()
