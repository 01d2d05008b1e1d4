"""Model settings, routing, request validation and the token budget rule."""

from __future__ import annotations

import pydantic
import pytest

from hivewire.model.v1 import model_pb2
from hivewire.services.model import convert
from hivewire.services.model.app import build_router, build_service
from hivewire.services.model.backends.base import (
    ChatTurn,
    estimate_prompt_tokens,
    http_error,
    summarize_body,
)
from hivewire.services.model.backends.ollama import _parse_time
from hivewire.services.model.domain import CallInfo, Completion
from hivewire.services.model.router import Router
from hivewire.services.model.settings import ModelProcessSettings, ModelSettings
from hivewire.services.runtime import errors
from hivewire.services.runtime.config import load_settings


def router(**kwargs: object) -> Router:
    values: dict[str, object] = {
        "routes": {
            "llama3:8b": "ollama",
            "gpt-4o-mini": "openai",
            "fast": "ollama/llama3.2:1b",
            "qwen*": "openai",
        },
        "backends": ["ollama", "openai", "deterministic"],
        "default_model": "llama3:8b",
        "default_embedding_model": "nomic-embed-text",
    }
    values.update(kwargs)
    return Router(**values)  # type: ignore[arg-type]


def test_routes_exact_alias_glob_prefix_and_default() -> None:
    r = router(fixed_names={"deterministic": "deterministic"})
    assert r.resolve("llama3:8b").backend == "ollama"
    assert (r.resolve("fast").backend, r.resolve("fast").model) == ("ollama", "llama3.2:1b")
    assert r.resolve("qwen2.5-7b").backend == "openai"
    prefixed = r.resolve("openai/meta-llama/Llama-3.1-8B-Instruct")
    assert (prefixed.backend, prefixed.model) == ("openai", "meta-llama/Llama-3.1-8B-Instruct")
    assert r.resolve("").model == "llama3:8b"
    assert r.resolve("deterministic").backend == "deterministic"
    assert r.is_default("ollama", "llama3:8b")


def test_unrouted_or_disabled_models_are_not_found() -> None:
    r = router(backends=["ollama"])
    for name in ("mistral", "gpt-4o-mini", "local/x"):
        with pytest.raises(errors.NotFound) as caught:
            r.resolve(name)
        assert caught.value.reason == "MODEL_NOT_FOUND"


def test_catch_all_backend_takes_every_other_name() -> None:
    r = router(catch_all="ollama")
    assert (r.resolve("phi3:mini").backend, r.resolve("phi3:mini").model) == ("ollama", "phi3:mini")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "HIVEWIRE_MODEL__ROUTES",
        '{"llama3:8b":"ollama","gpt-4o-mini":"openai","gemma-3-270m":"local"}',
    )
    monkeypatch.setenv("HIVEWIRE_MODEL__DEFAULT_MODEL", "llama3:8b")
    monkeypatch.setenv("HIVEWIRE_MODEL__OPENAI_URL", "http://gpu-box:8000/v1/")
    monkeypatch.setenv("HIVEWIRE_MODEL__OPENAI_API_KEY", "sk-secret")
    model = load_settings(ModelProcessSettings).model
    assert model.routes["gemma-3-270m"] == "local"
    assert model.openai_url == "http://gpu-box:8000/v1"
    assert "sk-secret" not in repr(model)
    assert model.enabled_backends()[:2] == ["ollama", "openai"]
    assert "deterministic" in model.enabled_backends()


def test_one_line_of_settings_enables_a_backend() -> None:
    assert "ollama" in ModelSettings(default_model="ollama/llama3:8b").enabled_backends()
    assert "openai" in ModelSettings(default_model="openai/Qwen2.5-7B").enabled_backends()
    assert "ollama" not in ModelSettings().enabled_backends()


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown backend"):
        ModelSettings(routes={"x": "vertex"})
    with pytest.raises(pydantic.ValidationError, match="needs default_model"):
        ModelSettings(default_backend="ollama")
    with pytest.raises(pydantic.ValidationError):
        ModelSettings(ollama_url="localhost:11434")


def test_auto_default_follows_the_default_backend() -> None:
    settings = ModelSettings(default_backend="deterministic", backends=["deterministic", "local"])
    assert build_router(settings, ["deterministic", "local"]).default_model == "deterministic"
    settings = ModelSettings(backends=["deterministic"])
    assert build_router(settings, ["deterministic"]).default_model == "deterministic"
    settings = ModelSettings(backends=["deterministic", "local"])
    assert build_router(settings, ["deterministic", "local"]).default_model == "gemma-3-270m"


def test_chat_validation_reports_every_bad_field() -> None:
    request = model_pb2.ChatRequest(
        model="m" * 300,
        messages=[
            model_pb2.ChatMessage(role=model_pb2.CHAT_ROLE_USER, content=""),
            model_pb2.ChatMessage(content="x"),
        ],
        params=model_pb2.GenerationParams(temperature=-0.1, top_p=1.5, stop=["", "ok"]),
    )
    with pytest.raises(errors.InvalidArgument) as caught:
        convert.chat_from_proto(request, max_output_tokens=100)
    assert [v.field for v in caught.value.violations] == [
        "model",
        "messages[1].role",
        "params.temperature",
        "params.top_p",
        "params.stop[0]",
    ]


def test_valid_chat_converts() -> None:
    request = model_pb2.ChatRequest(
        messages=[model_pb2.ChatMessage(role=model_pb2.CHAT_ROLE_TOOL, content="42", name="calc")],
        params=model_pb2.GenerationParams(temperature=0.0, max_tokens=5, seed=0),
    )
    call = convert.chat_from_proto(request, max_output_tokens=100)
    assert call.messages == (ChatTurn("tool", "42", "calc"),)
    assert (call.params.temperature, call.params.max_tokens, call.params.seed) == (0.0, 5, 0)
    assert call.params.top_p is None


def test_token_budget_header() -> None:
    assert convert.token_budget([("x-hivewire-token-budget", "120")]) == 120
    assert convert.token_budget([("x-hivewire-token-budget", "0")]) is None
    assert convert.token_budget([]) is None
    with pytest.raises(errors.InvalidArgument):
        convert.token_budget([("x-hivewire-token-budget", "-3")])


async def collect(service: object, call: object, info: CallInfo) -> tuple[str, Completion]:
    text, done = "", None
    async for item in service.stream(call, info):  # type: ignore[attr-defined]
        if isinstance(item, str):
            text += item
        else:
            done = item
    assert done is not None
    return text, done


async def test_budget_rule_on_the_domain_service() -> None:
    service = build_service(ModelSettings(backends=["deterministic"]))
    request = model_pb2.ChatRequest(
        messages=[model_pb2.ChatMessage(role=model_pb2.CHAT_ROLE_USER, content="abcd" * 5)]
    )
    call = convert.chat_from_proto(request, max_output_tokens=100)
    assert estimate_prompt_tokens(call.messages) == 9

    with pytest.raises(errors.ResourceExhausted):
        await collect(service, call, CallInfo(token_budget=9))
    text, done = await collect(service, call, CallInfo(token_budget=11))
    assert done.finish_reason == "budget"
    assert done.usage.completion_tokens == 2
    assert len(text.split(" ")) == 2
    _, unlimited = await collect(service, call, CallInfo())
    assert unlimited.finish_reason == "stop"
    await service.aclose()


def test_error_bodies_are_summarised() -> None:
    assert summarize_body(b'{"error": {"message": "model overloaded", "code": 503}}') == (
        "model overloaded"
    )
    assert summarize_body("x" * 1000).endswith("…")
    assert len(summarize_body("x" * 1000)) == 300
    err = http_error("openai", "gpt", 503, "down", retry_after=2.0, retry_after_header="7")
    assert isinstance(err, errors.Unavailable)
    assert err.retry_after == 7.0
    assert isinstance(
        http_error("openai", "gpt", 401, "", retry_after=1), errors.FailedPrecondition
    )


def test_ollama_nanosecond_timestamps_parse() -> None:
    parsed = _parse_time("2023-11-04T14:56:49.277302595-07:00")
    assert parsed is not None and parsed.microsecond == 277302
    assert _parse_time("garbage") is None
