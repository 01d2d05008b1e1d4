"""One trace per task across real processes, exported over OTLP to a receiver the test runs.

``hivewire submit`` (a process) -> coordinator (a process; the scheduler opens the
agent's ``Execute`` later, in the submitter's trace) -> agent (a process; its
handler asks the model service and calls the tool service, two more processes) ->
events on NATS, consumed by a subscriber in this process. Every process exports to
the :class:`OtlpReceiver`; the test checks that all of it is one trace and that
every span's parent is the span that caused it. The coordinator's log lines carry
the trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.events import ReceivedEvent, subscribe
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.e2e_mesh import REPO_ROOT, coordinator_process, mesh_process, wait_for_agents
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(150)

HIVEWIRE = str(Path(sys.executable).with_name("hivewire"))
TRACED = "tests.support.e2e_agents:TracedAgent"


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    # A short batch delay so spans arrive while the test waits for them.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def one(spans: list[ReceivedSpan], *, service: str, kind: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.kind == kind and name in s.name]
    assert len(found) == 1, (service, kind, name, [(s.service, s.kind, s.name) for s in spans])
    return found[0]


async def test_a_task_is_one_trace_from_the_client_to_every_hop(
    pki: Pki, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    policy = tmp_path / "tool-policy.toml"
    policy.write_text('[[rules]]\ncallers = ["spiffe://hivewire.local/agent/*"]\nallow = ["*"]\n')
    async with contextlib.AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(OtlpReceiver())
        env = otel_env(receiver)
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path,
                certs_dir=pki.dir,
                nats_url=nats.url,
                db_path=tmp_path / "c.db",
                env=env,
            )
        )
        for name, identity, extra in (
            ("model", "model", {"HIVEWIRE_MODEL__DEFAULT_BACKEND": "deterministic"}),
            ("tool", "tool", {"HIVEWIRE_TOOL__POLICY_FILE": str(policy)}),
        ):
            await stack.enter_async_context(
                mesh_process(
                    f"hivewire.services.{name}",
                    workdir=tmp_path,
                    certs_dir=pki.dir,
                    identity=identity,
                    nats_url=nats.url,
                    env={**env, **extra},
                )
            )
        await stack.enter_async_context(
            mesh_process(
                "hivewire.services.agent",
                TRACED,
                "--name",
                "traced",
                "--identity",
                "agent",
                workdir=tmp_path,
                name="traced",
                certs_dir=pki.dir,
                nats_url=nats.url,
                env={**env, "PYTHONPATH": str(REPO_ROOT)},
            )
        )
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        await wait_for_agents(coordinator_pb2_grpc.CoordinatorServiceStub(channel), 1)

        consumed: list[ReceivedEvent] = []

        async def on_event(received: ReceivedEvent) -> None:
            consumed.append(received)

        await stack.enter_async_context(
            subscribe(nats.url, "task.completed", on_event, durable="trace-audit")
        )

        # The client: the real CLI, as a process, exporting its spans too.
        cli = await asyncio.create_subprocess_exec(
            HIVEWIRE,
            "submit",
            "trace",
            "what is six times seven?",
            "--address",
            coordinator.address,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")},
                "HIVEWIRE_CERTS_DIR": str(pki.dir),
                **env,
            },
        )
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert "42" in out.decode()

        root = await eventually(
            lambda: one(receiver.spans, service="hivewire-cli", kind="client", name="StreamTask"),
            timeout=20,
            retry_on=(AssertionError,),
        )
        trace_id = root.trace_id

        def complete() -> list[ReceivedSpan]:
            found = receiver.trace(trace_id)
            names = {(s.service, s.kind, s.name) for s in found}
            assert ("hivewire-tool", "server", "/hivewire.tool.v1.ToolService/InvokeTool") in names
            assert ("hivewire-model", "server", "/hivewire.model.v1.ModelService/Generate") in names
            assert any(s.name.endswith("task.completed publish") for s in found), names
            assert consumed
            return found

        trace = await eventually(complete, timeout=20, retry_on=(AssertionError,))

    by_id = {s.span_id: s for s in trace}
    # Every span of the trace hangs off another span of the trace, up to the client's.
    for span in trace:
        if span is not root:
            assert span.parent_id in by_id, (span.service, span.name)
    assert root.parent_id == ""

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return by_id[span.parent_id]

    submit = one(trace, service="hivewire-coordinator", kind="server", name="StreamTask")
    assert parent(submit) is root
    attempt = one(trace, service="hivewire-coordinator", kind="internal", name="attempt trace")
    assert parent(attempt) is submit  # the scheduler's hop, in the submitter's trace
    execute_call = one(trace, service="hivewire-coordinator", kind="client", name="Execute")
    assert parent(execute_call) is attempt
    execute = one(trace, service="hivewire-agent", kind="server", name="Execute")
    assert parent(execute) is execute_call
    handler = one(trace, service="hivewire-agent", kind="internal", name="handle trace")
    assert parent(handler) is execute
    for service, method in (("model", "Generate"), ("tool", "InvokeTool")):
        call = one(trace, service="hivewire-agent", kind="client", name=method)
        assert parent(call) is handler
        served = one(trace, service=f"hivewire-{service}", kind="server", name=method)
        assert parent(served) is call
    created = one(
        trace, service="hivewire-coordinator", kind="producer", name="task.created publish"
    )
    assert parent(created) is submit
    completed = one(
        trace, service="hivewire-coordinator", kind="producer", name="task.completed publish"
    )
    assert parent(completed) in (attempt, submit)

    # The subscriber in this process continued the trace from the message headers.
    consumer = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert len(consumer) == 1
    assert f"{consumer[0].context.trace_id:032x}" == trace_id
    assert f"{consumer[0].parent.span_id:016x}" == completed.span_id
    assert consumed[0].event.traceparent.split("-")[2] == completed.span_id

    # Log lines of the task carry its trace id.
    log = coordinator.stderr_path.read_text()
    assert f"trace={trace_id}" in log, coordinator.log_tail()
