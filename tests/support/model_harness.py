"""An in-process model service on a real mTLS gRPC server, for the model tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from hivewire.events.v1 import events_pb2
from hivewire.model.v1 import model_pb2_grpc
from hivewire.services.model.app import build_service
from hivewire.services.model.client import ModelClient
from hivewire.services.model.service import ModelService
from hivewire.services.model.servicer import SERVICE_NAME, ModelServicer, add_to_server
from hivewire.services.model.settings import ModelSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from tests.conftest import Pki


@dataclass
class RecordedEvent:
    """One event the service published."""

    event_type: str
    subject: str
    data: events_pb2.ModelEventData


@dataclass
class RecordingPublisher:
    """Keeps what the service publishes (the EventPublisher protocol)."""

    events: list[RecordedEvent] = field(default_factory=list)

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: events_pb2.ModelEventData,
        task_sequence: int = 0,
    ) -> None:
        self.events.append(RecordedEvent(event_type, subject, data))

    def types(self) -> list[str]:
        return [event.event_type for event in self.events]


@dataclass
class ModelHarness:
    """A running model service and a client channel to it."""

    service: ModelService
    server: ServiceServer
    channel: grpc.aio.Channel
    client: ModelClient
    stub: Any
    events: RecordingPublisher


@asynccontextmanager
async def serve_model(
    pki: Pki, settings: ModelSettings, **overrides: Any
) -> AsyncIterator[ModelHarness]:
    """Run the model service for ``settings`` on 127.0.0.1:0 with the mesh PKI."""
    process = load_settings(
        host="127.0.0.1",
        port=0,
        certs_dir=pki.dir,
        identity="model",
        grace_period=1.0,
        **overrides,
    )
    events = RecordingPublisher()
    service = build_service(settings, events=events)
    servicer = ModelServicer(service, max_output_tokens=settings.max_output_tokens)
    binding = ServiceBinding(SERVICE_NAME, lambda s: add_to_server(servicer, s))
    try:
        async with ServiceServer(process, [binding]) as server:
            async with secure_channel(server.address, pki.files("agent")) as channel:
                yield ModelHarness(
                    service=service,
                    server=server,
                    channel=channel,
                    client=ModelClient(channel, default_timeout=30.0),
                    stub=model_pb2_grpc.ModelServiceStub(channel),
                    events=events,
                )
    finally:
        await service.aclose()
