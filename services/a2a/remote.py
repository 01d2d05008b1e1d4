"""A remote A2A agent as a hivewire agent: the adapter agent process.

``python -m hivewire.services.a2a.remote --card-url https://host/.well-known/agent-card.json``
fetches the remote agent's card and serves a hivewire agent (the usual agent runtime:
mTLS, health, registration) whose capabilities are the remote skills, so tasks and plan
steps route to it like to any agent. Each task becomes an A2A ``SendStreamingMessage``
to the remote agent, through the official ``a2a-sdk`` client:

- the remote stream's working statuses are progress, its artifact updates are partial
  results, its final artifact (``result`` if there is one, else the last) is the output;
- an ``input-required`` status is a hivewire input request; the answer goes back as the
  next message of the remote task (approvals as ``{"approved": ...}``);
- cancelling the hivewire task cancels the remote task (``CancelTask``);
- failed or rejected remote tasks fail the task; an unreachable remote agent is a
  retryable failure;
- health: the card URL is fetched every ``HIVEWIRE_A2A__CARD_REFRESH`` seconds; while
  it fails the agent is unhealthy in discovery (no new tasks) and NOT_SERVING.

See docs/interop.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import re
import ssl
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
from a2a.client import A2AClientError, Client, ClientConfig, ClientFactory
from a2a.client.card_resolver import parse_agent_card
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import A2AError
from google.protobuf import json_format, struct_pb2

from hivewire.services.a2a import convert
from hivewire.services.a2a.settings import A2aProcessSettings
from hivewire.services.agent.convert import payload_from_proto, payload_to_proto
from hivewire.services.agent.sdk import (
    Agent,
    AgentCardInfo,
    CapabilitySpec,
    Handler,
    InputAnswer,
    InputKind,
    Output,
    Payload,
    PermanentError,
    RetryableError,
    TaskContext,
)
from hivewire.services.agent.serve import AgentServer, running_agent, settings_for_agent
from hivewire.services.base.lifecycle import cancel_and_wait
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.server import serve_until_signal
from hivewire.services.runtime.tls import TlsFiles

logger = logging.getLogger(__name__)

_NOT_NAME = re.compile(r"[^a-z0-9-]+")
_CANCEL_TIMEOUT = 5.0
_UNREACHABLE = (A2AError, httpx.HTTPError, OSError)


def capability_name(skill_id: str, prefix: str = "") -> str:
    """A hivewire capability name for a remote skill id (lower case, digits, dashes)."""
    name = _NOT_NAME.sub("-", f"{prefix}{skill_id}".lower()).strip("-")
    return (name or "skill")[:63]


async def fetch_card(http: httpx.AsyncClient, url: str) -> a2a.AgentCard:
    """The remote agent's card (raises ``httpx.HTTPError`` or ``ValueError``)."""
    response = await http.get(url)
    response.raise_for_status()
    return parse_agent_card(response.json())


def _answer_message(
    task_id: str, context_id: str, request: a2a.Message, answer: InputAnswer
) -> a2a.Message:
    message = a2a.Message(
        message_id=uuid.uuid4().hex, task_id=task_id, context_id=context_id, role=a2a.ROLE_USER
    )
    if _asks_approval(request):
        data = {"approved": answer.approved, "comment": answer.comment}
        message.parts.append(a2a.Part(data=json_format.ParseDict(data, struct_pb2.Value())))
        message.parts.append(a2a.Part(text="yes" if answer.approved else "no"))
    else:
        message.parts.extend(convert.parts_from_payload(payload_to_proto(answer.value)))
    return message


def _asks_approval(request: a2a.Message) -> bool:
    for part in request.parts:
        if part.WhichOneof("content") == "data":
            details = json_format.MessageToDict(part.data)
            if (
                isinstance(details, dict)
                and details.get(convert.META_KEY, {}).get("kind") == "approval"
            ):
                return True
    return False


class RemoteA2aAgent(Agent):
    """An agent whose capabilities are a remote A2A agent's skills, forwarded over A2A."""

    def __init__(self, card: a2a.AgentCard, http: httpx.AsyncClient, *, prefix: str = "") -> None:
        """Describe the remote agent (nothing is called until :meth:`setup`).

        Args:
            card: The remote agent's card.
            http: The HTTP client (TLS settings) used to reach it.
            prefix: Prefix of the capability names.
        """
        self.remote = card
        self._http = http
        self._client: Client | None = None
        self.skills = {capability_name(s.id, prefix): s for s in card.skills}

    def card(self, *, max_concurrency: int | None = None) -> AgentCardInfo:
        """The hivewire card: one capability per remote skill."""
        capabilities = tuple(
            CapabilitySpec(
                name=name,
                description=skill.description or skill.name,
                input_description=", ".join(skill.input_modes or self.remote.default_input_modes),
                output_description=", ".join(
                    skill.output_modes or self.remote.default_output_modes
                ),
                method_name="forward",
            )
            for name, skill in self.skills.items()
        )
        interface = (
            self.remote.supported_interfaces[0] if self.remote.supported_interfaces else None
        )
        return AgentCardInfo(
            name=capability_name(self.remote.name),
            version=self.remote.version or "0.0.0",
            description=self.remote.description or f"The A2A agent {self.remote.name}",
            capabilities=capabilities,
            max_concurrency=max_concurrency or self.max_concurrency,
            labels={"a2a.remote": interface.url if interface is not None else ""},
        )

    def handler(self, capability_name: str) -> Handler | None:
        """Forward tasks of a remote skill."""
        skill = self.skills.get(capability_name)
        if skill is None:
            return None
        return functools.partial(self.forward, skill.id)

    async def setup(self) -> None:
        """Create the A2A client from the card (JSON-RPC or gRPC, as the card offers)."""
        config = ClientConfig(streaming=True, httpx_client=self._http)
        self._client = ClientFactory(config).create(self.remote)

    async def teardown(self) -> None:
        """Close the A2A client."""
        if self._client is not None:
            await self._client.close()

    async def forward(self, skill_id: str, task: Payload, ctx: TaskContext) -> Output:
        """Run one task on the remote agent and report its stream as this task's progress."""
        assert self._client is not None, "setup() was not run"
        forwarding = _Forwarding(self._client, skill_id, ctx)
        try:
            return await forwarding.run(task)
        except asyncio.CancelledError:
            await forwarding.cancel_remote()
            raise
        except A2AClientError as exc:
            raise RetryableError(
                "REMOTE_A2A_ERROR", f"the remote A2A agent failed: {exc}"
            ) from None
        except A2AError as exc:
            # The remote agent answered with a protocol error: trying again changes nothing.
            raise PermanentError(
                "REMOTE_A2A_REJECTED", f"the remote A2A agent refused the task: {exc}"
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            raise RetryableError(
                "REMOTE_A2A_UNAVAILABLE", f"the remote A2A agent is unreachable: {exc}"
            ) from None


class _Forwarding:
    """One hivewire task forwarded to the remote agent: its remote task and its stream."""

    def __init__(self, client: Client, skill_id: str, ctx: TaskContext) -> None:
        self._client = client
        self._skill_id = skill_id
        self._ctx = ctx
        self.task_id = ""
        self.context_id = ""
        self._fraction = 0.0
        self._fold = convert.ArtifactFold()
        self._status = a2a.TaskStatus()

    async def run(self, task: Payload) -> Output:
        message = a2a.Message(
            message_id=f"{self._ctx.task_id}-{self._ctx.attempt}",
            role=a2a.ROLE_USER,
            parts=convert.parts_from_payload(payload_to_proto(task)),
        )
        if not message.parts:
            # A2A messages carry at least one part: an empty input is an empty object.
            message.parts.append(a2a.Part(data=struct_pb2.Value(struct_value=struct_pb2.Struct())))
        message.metadata.update({convert.SKILL_KEY: self._skill_id})
        while True:
            await self._stream(message)
            state = self._status.state
            if state == a2a.TASK_STATE_INPUT_REQUIRED:
                asked = self._status.message
                kind = InputKind.APPROVAL if _asks_approval(asked) else InputKind.TEXT
                answer = await self._ctx.request_input(
                    convert.text_of(asked.parts) or "?", kind=kind
                )
                message = _answer_message(self.task_id, self.context_id, asked, answer)
                message.metadata.update({convert.SKILL_KEY: self._skill_id})
                continue
            return self._outcome(state)

    async def _stream(self, message: a2a.Message) -> None:
        request = a2a.SendMessageRequest(message=message)
        async for response in self._client.send_message(request):
            kind = response.WhichOneof("payload")
            if kind == "task":
                self.task_id, self.context_id = response.task.id, response.task.context_id
                self._status.CopyFrom(response.task.status)
            elif kind == "status_update":
                await self._on_status(response.status_update)
            elif kind == "artifact_update":
                await self._on_artifact(response.artifact_update)
            elif kind == "message":
                self._status.state = a2a.TASK_STATE_COMPLETED
                self._status.message.CopyFrom(response.message)

    async def _on_status(self, update: a2a.TaskStatusUpdateEvent) -> None:
        self.task_id = self.task_id or update.task_id
        self._status.CopyFrom(update.status)
        if update.status.state == a2a.TASK_STATE_WORKING:
            meta = json_format.MessageToDict(update.metadata).get(convert.META_KEY, {})
            fraction = meta.get("progress", {}).get("fraction")
            if isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0:
                self._fraction = float(fraction)
            text = convert.text_of(update.status.message.parts)
            await self._ctx.progress(self._fraction, "remote", text or "working")

    async def _on_artifact(self, update: a2a.TaskArtifactUpdateEvent) -> None:
        self._fold.add(update)
        artifact = update.artifact
        content = payload_from_proto(convert.payload_from_parts(artifact.parts))
        await self._ctx.partial(
            content,
            artifact_id=artifact.artifact_id,
            append=update.append,
            last_chunk=update.last_chunk,
            name=artifact.name,
        )

    def _outcome(self, state: int) -> Output:
        text = convert.text_of(self._status.message.parts)
        if state == a2a.TASK_STATE_COMPLETED:
            artifacts = {a.artifact_id: a for a in self._fold.artifacts}
            chosen = artifacts.get(convert.RESULT_ARTIFACT) or next(
                reversed(list(artifacts.values())), None
            )
            if chosen is not None:
                return payload_from_proto(convert.payload_from_parts(chosen.parts))
            return text
        if state == a2a.TASK_STATE_CANCELED:
            raise PermanentError(
                "REMOTE_A2A_CANCELED", text or "the remote agent cancelled the task"
            )
        if state == a2a.TASK_STATE_AUTH_REQUIRED:
            raise PermanentError(
                "REMOTE_A2A_AUTH_REQUIRED", text or "the remote agent asks for auth"
            )
        name = a2a.TaskState.Name(state)
        raise PermanentError("REMOTE_A2A_FAILED", f"{name}: {text}" if text else name)

    async def cancel_remote(self) -> None:
        """Cancel the remote task (best effort, bounded), when there is one."""
        if not self.task_id:
            return
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT):
                await asyncio.shield(
                    self._client.cancel_task(a2a.CancelTaskRequest(id=self.task_id))
                )
            logger.info("cancelled remote A2A task %s", self.task_id)
        except (TimeoutError, *_UNREACHABLE) as exc:
            logger.warning("could not cancel remote A2A task %s: %s", self.task_id, exc)


# --- the adapter process ----------------------------------------------------------------


def remote_ssl_context(settings: A2aProcessSettings) -> ssl.SSLContext:
    """TLS towards the remote agent: its CA (or the system's) and, optionally, a mesh identity."""
    config = settings.a2a
    context = ssl.create_default_context(cafile=config.remote_ca_file or None)
    if config.remote_client_identity:
        files = TlsFiles.for_identity(settings.certs_dir, config.remote_client_identity)
        context.load_cert_chain(str(files.cert), str(files.key))
    return context


async def watch_health(
    http: httpx.AsyncClient, url: str, running: AgentServer, interval: float
) -> None:
    """Follow the remote card endpoint: unhealthy in discovery while it fails."""
    healthy = True
    while True:
        await asyncio.sleep(interval)
        try:
            await fetch_card(http, url)
            now = True
        except (httpx.HTTPError, ValueError) as exc:
            now = False
            if healthy:
                logger.warning("remote A2A agent card %s unreachable: %s", url, exc)
        if now == healthy:
            continue
        healthy = now
        logger.info("remote A2A agent %s is %s", url, "healthy" if now else "unhealthy")
        await running.server.set_serving(now)
        if running.registry is not None and running.instance is not None:
            with contextlib.suppress(Exception):
                await running.registry.set_healthy(running.instance.instance_id, now)


async def serve_remote(settings: A2aProcessSettings) -> None:
    """Fetch the remote card and serve the adapter agent until SIGTERM."""
    config = settings.a2a
    if not config.remote_card_url:
        raise SystemExit(
            "set the remote agent's card URL (--card-url or HIVEWIRE_A2A__REMOTE_CARD_URL)"
        )
    timeout = httpx.Timeout(30.0, read=None)
    async with httpx.AsyncClient(verify=remote_ssl_context(settings), timeout=timeout) as http:
        try:
            card = await fetch_card(http, config.remote_card_url)
        except (httpx.HTTPError, ValueError) as exc:
            raise SystemExit(
                f"Error: cannot read the remote agent card {config.remote_card_url}: {exc}"
            ) from None
        agent = RemoteA2aAgent(card, http, prefix=config.remote_skill_prefix)
        name = settings.agent.name or agent.card().name
        settings = settings.model_copy(
            update={"agent": settings.agent.model_copy(update={"name": name})}
        )
        settings = settings_for_agent(settings, agent)
        logger.info("remote A2A agent %s: skills %s", card.name, ", ".join(agent.skills))
        async with running_agent(agent, settings) as running:
            monitor = asyncio.create_task(
                watch_health(http, config.remote_card_url, running, config.card_refresh)
            )
            try:
                await serve_until_signal(running.server)
            finally:
                await cancel_and_wait([monitor])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hivewire.services.a2a.remote --card-url URL``."""
    parser = argparse.ArgumentParser(
        prog="python -m hivewire.services.a2a.remote",
        description="Serve a remote A2A agent as a hivewire agent (settings: HIVEWIRE_*)",
    )
    parser.add_argument("--card-url", help="the remote agent card (HIVEWIRE_A2A__REMOTE_CARD_URL)")
    parser.add_argument(
        "--ca-file", help="CA bundle of the remote agent (HIVEWIRE_A2A__REMOTE_CA_FILE)"
    )
    parser.add_argument(
        "--skill-prefix", help="capability name prefix (HIVEWIRE_A2A__REMOTE_SKILL_PREFIX)"
    )
    parser.add_argument("--name", help="agent name (default: from the remote card)")
    parser.add_argument("--host", help="interface to bind (HIVEWIRE_HOST)")
    parser.add_argument("--port", type=int, help="gRPC port (HIVEWIRE_PORT; 0: any)")
    parser.add_argument("--log-level", help="log level (HIVEWIRE_LOG_LEVEL)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "a2a": {
            "remote_card_url": args.card_url,
            "remote_ca_file": args.ca_file,
            "remote_skill_prefix": args.skill_prefix,
        },
        "agent": {"name": args.name},
    }
    settings = load_settings(A2aProcessSettings, **overrides)
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve_remote(settings))


if __name__ == "__main__":
    main()
