"""``python -m hivewire.services.model`` as a real process: grpcurl, events on NATS, SIGTERM."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hivewire.services.runtime.events import replay
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.ollama_standin import DEFAULT_REPLY, OllamaStandin


async def test_model_service_process_serves_grpcurl_and_publishes_events(
    pki: Pki, nats_server: NatsServer, grpcurl, tmp_path: Path
) -> None:
    async with OllamaStandin() as ollama:
        service = ServiceProcess(
            "hivewire.services.model",
            workdir=tmp_path,
            certs_dir=pki.dir,
            identity="model",
            nats_url=nats_server.url,
            env={
                "HIVEWIRE_DISCOVERY": "static",
                # One line of settings points the service at Ollama.
                "HIVEWIRE_MODEL__DEFAULT_MODEL": "ollama/llama3:8b",
                "HIVEWIRE_MODEL__OLLAMA_URL": ollama.url,
            },
        )
        async with service:
            tls = pki.files("agent")
            listed = await grpcurl("list", tls=tls, address=service.address)
            assert listed.returncode == 0, listed
            assert "hivewire.model.v1.ModelService" in listed.stdout.split()

            chat = await grpcurl(
                "hivewire.model.v1.ModelService/Chat",
                tls=tls,
                address=service.address,
                flags=["-H", "x-hivewire-task-id: task-e2e", "-H", "x-correlation-id: corr-e2e"],
                input=json.dumps(
                    {"messages": [{"role": "CHAT_ROLE_USER", "content": "Why is the sky blue?"}]}
                ),
            )
            assert chat.returncode == 0, chat
            messages = chat.messages()
            text = "".join(m["chunk"]["text"] for m in messages if "chunk" in m)
            assert text == DEFAULT_REPLY
            done = messages[-1]["done"]
            # grpcurl prints proto field names.
            assert done["finish_reason"] == "FINISH_REASON_STOP"
            assert done["backend"] == "ollama"
            assert int(done["usage"]["completion_tokens"]) == len(DEFAULT_REPLY.split())

            unknown = await grpcurl(
                "hivewire.model.v1.ModelService/Chat",
                tls=tls,
                address=service.address,
                input=json.dumps(
                    {"model": "nope", "messages": [{"role": "CHAT_ROLE_USER", "content": "x"}]}
                ),
            )
            assert unknown.returncode == 64 + 5, unknown  # NOT_FOUND

            async def completed_event() -> None:
                seen = [
                    received.event
                    async for received in replay(nats_server.url, "model.>")
                    if received.event.type == "model.request_completed"
                ]
                assert seen, "no model.request_completed event yet"
                event = seen[-1]
                assert event.model.task_id == "task-e2e"
                assert event.correlation_id == "corr-e2e"
                assert event.model.usage.completion_tokens == len(DEFAULT_REPLY.split())

            await eventually(completed_event, timeout=20)

            assert service.metrics_port is not None
            async with httpx.AsyncClient() as http:
                scrape = await http.get(f"http://127.0.0.1:{service.metrics_port}/metrics")
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(scrape.text)
                for s in family.samples
            }
            labels = (("backend", "ollama"), ("model", "llama3:8b"))
            assert samples[("hivewire_model_completion_tokens_total", labels)] == len(
                DEFAULT_REPLY.split()
            )
            assert samples[("hivewire_model_circuit_state", (("backend", "ollama"),))] == 0
            assert samples[("hivewire_model_time_to_first_token_seconds_count", labels)] == 1
            assert await service.terminate() == 0
