"""Stream a hivewire skill through the A2A gateway with the official a2a-sdk client.

    .venv/bin/python examples/a2a-python/stream.py calculate "6 * 7"

Reads the gateway's URL from .hivewire/endpoints.json (written by ``hivewire up``) and
uses the mesh's client certificate (certs/client.pem); with ``HIVEWIRE_TOKEN`` set (an
API key from ``hivewire keys create``, or a JWT) it presents no certificate and the
SDK's ``AuthInterceptor`` sends the token for the card's ``bearer`` scheme instead.
Prints one line per A2A event.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import uuid
from pathlib import Path

import httpx
from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.auth.credentials import CredentialService
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format


class Token(CredentialService):
    """The bearer token, for the card's ``bearer`` security scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(
        self, security_scheme_name: str, context: ClientCallContext | None
    ) -> str | None:
        return self.token if security_scheme_name == "bearer" else None


async def main(url: str, skill: str, text: str) -> int:
    token = os.environ.get("HIVEWIRE_TOKEN", "")
    tls = ssl.create_default_context(cafile="certs/ca.pem")
    if not token:
        tls.load_cert_chain("certs/client.pem", "certs/client.key")
    async with httpx.AsyncClient(verify=tls, timeout=60) as http:
        card = await A2ACardResolver(http, url).get_agent_card()
        interceptors = [AuthInterceptor(Token(token))] if token else []
        client = ClientFactory(ClientConfig(httpx_client=http)).create(card, interceptors)
        message = a2a.Message(message_id=uuid.uuid4().hex, role=a2a.ROLE_USER)
        message.parts.add(text=text)
        message.metadata.update({"skill": skill})
        state = a2a.TASK_STATE_UNSPECIFIED
        async for event in client.send_message(a2a.SendMessageRequest(message=message)):
            kind = event.WhichOneof("payload")
            body = json_format.MessageToDict(getattr(event, kind))
            print(kind, json.dumps(body))
            if kind == "status_update":
                state = event.status_update.status.state
    print("final state:", a2a.TaskState.Name(state))  # type: ignore[arg-type]
    return 0 if state == a2a.TASK_STATE_COMPLETED else 1


if __name__ == "__main__":
    gateway = json.loads(Path(".hivewire/endpoints.json").read_text())["a2a"]["url"]
    sys.exit(asyncio.run(main(gateway, sys.argv[1], " ".join(sys.argv[2:]))))
