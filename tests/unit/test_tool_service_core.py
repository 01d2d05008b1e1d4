"""The tool service's domain with real plugins (entry points), in process, without gRPC.

Plugins are found for real: the test writes a ``.dist-info`` with ``entry_points.txt``
and puts it on ``sys.path``, exactly what ``pip install`` of a plugin package does.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    ToolCall,
    ToolOutcome,
    ToolSource,
)
from hivewire.services.tool.registry import ThreadRunner
from hivewire.services.tool.sdk import arguments_digest
from hivewire.services.tool.service import ToolService, open_tool_service
from hivewire.services.tool.settings import ToolSettings
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.tool_plugins import PLUGIN_DIR, install_plugins

AGENT = "spiffe://hivewire.local/agent/test"
CLIENT = "spiffe://hivewire.local/client/client"


@pytest.fixture(scope="module")
def plugins_on_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    directory = install_plugins(tmp_path_factory.mktemp("site"))
    entries = [str(directory), str(PLUGIN_DIR)]
    sys.path[:0] = entries
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in entries:
            sys.path.remove(entry)


class RecordingPublisher:
    """Keeps what would go to NATS (the publisher protocol, nothing more)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, events_pb2.ToolEventData]] = []

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: events_pb2.ToolEventData,
        task_sequence: int = 0,
    ) -> None:
        self.events.append((event_type, subject, data))

    def of(self, call_id: str) -> list[tuple[str, str]]:
        return [(kind, data.outcome) for kind, subject, data in self.events if subject == call_id]


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


def make_settings(**overrides: Any) -> ToolSettings:
    values: dict[str, Any] = {"plugins": ["hw_*"], "max_result_bytes": 4096}
    values.update(overrides)
    return ToolSettings(**values)


@pytest.fixture
async def service(
    plugins_on_path: None, publisher: RecordingPublisher, pki: Pki
) -> AsyncIterator[ToolService]:
    async with open_tool_service(
        make_settings(), publisher=publisher, mesh_ca=pki.files("coordinator").ca
    ) as svc:
        yield svc


async def run(
    service: ToolService, name: str, arguments: Mapping[str, Any], **call: Any
) -> list[Any]:
    call.setdefault("caller", AGENT)
    return [e async for e in service.invoke(ToolCall(tool_name=name, arguments=arguments, **call))]


def calls(tool: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "hivewire_tool_calls_total", {"tool": tool, "outcome": outcome}
    )
    return value or 0.0


# -- plugins --------------------------------------------------------------------------


async def test_plugins_are_discovered_and_broken_ones_skipped(
    plugins_on_path: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hivewire.services.tool"):
        async with open_tool_service(make_settings()) as svc:
            tools = {t.name: t for t in svc.list_tools(AGENT)}
    assert {"echo", "add_numbers", "explode", "hang", "delete_file"} <= set(tools)
    assert {"calculator", "json_query", "http_fetch", "text"} <= set(tools)
    assert tools["echo"].source is ToolSource.PLUGIN
    assert tools["echo"].version == "1.2.3"
    assert tools["add_numbers"].version == "9.9"
    assert tools["calculator"].source is ToolSource.BUILTIN
    assert tools["delete_file"].requires_approval
    assert tools["add_numbers"].input_schema["properties"]["mode"]["enum"] == ["sum", "product"]
    failed = {r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR}
    assert any("hw_broken" in m and "skipped" in m for m in failed)
    assert any("hw_not_a_tool" in m and "skipped" in m for m in failed)


async def test_plugin_selection_and_disabled_tools(plugins_on_path: None) -> None:
    settings = make_settings(plugins=["hw_test_tools"], disabled_tools=["explode", "json_*"])
    async with open_tool_service(settings) as svc:
        names = {t.name for t in svc.list_tools(AGENT)}
    assert "echo" in names and "explode" not in names and "json_query" not in names
    async with open_tool_service(make_settings(plugins=[])) as svc:
        assert "echo" not in {t.name for t in svc.list_tools(AGENT)}


# -- results, errors, progress ----------------------------------------------------------


async def test_progress_then_result(service: ToolService, publisher: RecordingPublisher) -> None:
    before = calls("echo", "ok")
    events = await run(service, "echo", {"message": "hi", "repeat": 3}, call_id="c-echo")
    assert [type(e) for e in events] == [ProgressUpdate] * 3 + [ToolOutcome]
    assert [e.fraction for e in events[:3]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert events[-1] == ToolOutcome(result={"result": "hi hi hi"}, text="hi hi hi")
    assert publisher.of("c-echo") == [("tool.invoked", ""), ("tool.completed", "ok")]
    assert calls("echo", "ok") == before + 1


async def test_sync_and_nested_tools(service: ToolService) -> None:
    [added] = await run(service, "add_numbers", {"a": 2, "b": 5, "mode": "product"})
    assert added == ToolOutcome(result={"value": 10}, text='{"value":10}')
    [centre] = await run(service, "centroid", {"points": [{"x": 0, "y": 0}, {"x": 4, "y": 2}]})
    assert isinstance(centre, ToolOutcome) and centre.result == {"x": 2, "y": 1}


async def test_crash_is_a_classified_error_and_the_service_carries_on(
    service: ToolService, publisher: RecordingPublisher
) -> None:
    [crash] = await run(service, "explode", {"note": "x"}, call_id="c-crash")
    assert isinstance(crash, ErrorInfo)
    assert (crash.code, crash.reason) == ("INTERNAL", "TOOL_CRASHED")
    assert "RuntimeError: boom x" in crash.message
    assert publisher.of("c-crash") == [("tool.invoked", ""), ("tool.failed", "error")]
    [refused] = await run(service, "refuse", {"what": "that"})
    assert refused == ErrorInfo(
        code="FAILED_PRECONDITION", reason="REFUSED_ON_PURPOSE", message="refusing that"
    )
    [ok] = await run(service, "add_numbers", {"a": 1, "b": 1})
    assert isinstance(ok, ToolOutcome)
    assert service.running == 0


async def test_refusals(service: ToolService, publisher: RecordingPublisher) -> None:
    with pytest.raises(NotFound) as missing:
        await run(service, "no_such_tool", {}, call_id="c-missing")
    assert missing.value.reason == "TOOL_NOT_FOUND"
    assert calls("_unknown", "error") >= 1
    with pytest.raises(InvalidArgument) as invalid:
        await run(service, "add_numbers", {"a": "one", "c": 1}, call_id="c-invalid")
    assert invalid.value.reason == "INVALID_TOOL_ARGUMENTS"
    assert {v.field for v in invalid.value.violations} == {
        "arguments.a",
        "arguments.b",
        "arguments.c",
    }
    with pytest.raises(PermissionDenied) as denied:
        await run(service, "echo", {"message": "x"}, caller=CLIENT, call_id="c-denied")
    assert denied.value.reason == "TOOL_NOT_ALLOWED"
    # A forbidden caller cannot probe which tools exist.
    with pytest.raises(PermissionDenied):
        await run(service, "no_such_tool", {}, caller=CLIENT)
    with pytest.raises(PermissionDenied):
        await run(service, "echo", {"message": "x"}, caller="")
    assert publisher.of("c-denied") == [("tool.failed", "denied")]
    assert publisher.of("c-invalid") == [("tool.failed", "error")]


async def test_results_are_size_capped(service: ToolService) -> None:
    [big] = await run(service, "big_output", {"size": 1_000_000})
    assert isinstance(big, ToolOutcome) and big.truncated
    assert len(big.text.encode()) <= 4096
    assert big.result["blob"].startswith("xxx") and len(big.result["blob"]) < 4096
    [small] = await run(service, "big_output", {"size": 10})
    assert isinstance(small, ToolOutcome) and not small.truncated


# -- timeouts and cancellation ----------------------------------------------------------


async def test_hanging_async_tool_times_out(
    service: ToolService, publisher: RecordingPublisher
) -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        await run(service, "hang", {}, call_id="c-hang")
    assert caught.value.reason == "TOOL_TIMEOUT"
    assert publisher.of("c-hang") == [("tool.invoked", ""), ("tool.failed", "timeout")]
    assert service.running == 0


async def test_caller_deadline_bounds_the_call(service: ToolService) -> None:
    hw = importlib.import_module("hw_test_tools")
    hw.SLOW_CANCELLED.clear()
    with pytest.raises(DeadlineExceeded) as caught:
        await run(service, "slow", {"seconds": 60}, timeout=0.2)
    assert caught.value.reason == "TOOL_TIMEOUT"
    assert hw.SLOW_CANCELLED.is_set()


async def test_sync_tool_is_told_to_stop(plugins_on_path: None) -> None:
    hw = importlib.import_module("hw_test_tools")
    async with open_tool_service(make_settings(max_sync_threads=1)) as svc:
        spinning = asyncio.create_task(run(svc, "sync_spin", {}))
        runner: ThreadRunner = next(
            t for t in svc.registry.tools() if t.name == "sync_spin"
        )._threads  # type: ignore[attr-defined]
        await eventually(lambda: runner.busy == 1)
        with pytest.raises(ResourceExhausted) as exhausted:
            await run(svc, "add_numbers", {"a": 1, "b": 2})
        assert exhausted.value.reason == "TOOL_THREADS_EXHAUSTED"
        with pytest.raises(DeadlineExceeded):
            await spinning
        await eventually(hw.SPIN_STOPPED.is_set)
        await eventually(lambda: runner.busy == 0)
        [ok] = await run(svc, "add_numbers", {"a": 1, "b": 2})
        assert isinstance(ok, ToolOutcome)


async def test_cancelling_the_caller_cancels_the_tool(
    service: ToolService, publisher: RecordingPublisher
) -> None:
    hw = importlib.import_module("hw_test_tools")
    hw.SLOW_CANCELLED.clear()
    started = asyncio.Event()

    async def consume() -> None:
        call = ToolCall(
            tool_name="slow", arguments={"seconds": 60}, caller=AGENT, call_id="c-cancel"
        )
        async for event in service.invoke(call):
            if isinstance(event, ProgressUpdate):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    assert service.running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hw.SLOW_CANCELLED.is_set()
    assert service.running == 0
    [(kind, outcome)] = publisher.of("c-cancel")[1:]
    assert kind == "tool.failed" and outcome == "error"


async def test_concurrency_limit(plugins_on_path: None) -> None:
    async with open_tool_service(make_settings(max_concurrent_calls=1)) as svc:
        started = asyncio.Event()

        async def consume() -> None:
            call = ToolCall(tool_name="slow", arguments={"seconds": 60}, caller=AGENT)
            async for _ in svc.invoke(call):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(ResourceExhausted) as caught:
            await run(svc, "calculator", {"expression": "1+1"})
        assert caught.value.reason == "TOO_MANY_TOOL_CALLS"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [ok] = await run(svc, "calculator", {"expression": "1+1"})
        assert isinstance(ok, ToolOutcome)


# -- approval and policy ----------------------------------------------------------------


async def test_approval_flow(service: ToolService, publisher: RecordingPublisher, pki: Pki) -> None:
    args = {"path": "/tmp/report.txt"}
    [asked] = await run(service, "delete_file", args, call_id="c-ask")
    assert asked == ApprovalRequest(
        tool_name="delete_file",
        arguments_digest=arguments_digest(args),
        prompt="Delete /tmp/report.txt?",
    )
    assert publisher.of("c-ask") == [("tool.approval_requested", "approval_required")]
    signed = ApprovalSigner(pki.files("coordinator")).sign(
        task_id="t-1",
        tool_name="delete_file",
        arguments_digest=asked.arguments_digest,
        request_id="req-1",
        approved_by=CLIENT,
    )
    grant = ApprovalGrant("req-1", "alice", asked.arguments_digest, signed)
    [done] = await run(service, "delete_file", args, approval=grant, task_id="t-1")
    assert done == ToolOutcome(
        result={"deleted": "/tmp/report.txt"}, text='{"deleted":"/tmp/report.txt"}'
    )
    with pytest.raises(PermissionDenied) as mismatch:
        await run(service, "delete_file", {"path": "/etc/passwd"}, approval=grant, task_id="t-1")
    assert mismatch.value.reason == "APPROVAL_DIGEST_MISMATCH"
    with pytest.raises(PermissionDenied) as replayed:
        await run(service, "delete_file", args, approval=grant, task_id="t-1")
    assert replayed.value.reason == "APPROVAL_REPLAYED"
    with pytest.raises(InvalidArgument) as no_request:
        await run(
            service, "delete_file", args, approval=ApprovalGrant("", "a", grant.arguments_digest)
        )
    assert no_request.value.violations[0].field == "approval.request_id"


async def test_policy_file_controls_access_and_approval(
    plugins_on_path: None, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
[[rules]]
callers = ["{AGENT}"]
allow = ["calculator", "echo"]
require_approval = ["calculator"]

[[rules]]
callers = ["{CLIENT}"]
allow = ["*"]
deny = ["delete_*"]
"""
    )
    async with open_tool_service(make_settings(policy_file=policy)) as svc:
        listed = {t.name: t for t in svc.list_tools(AGENT)}
        assert set(listed) == {"calculator", "echo"}
        assert listed["calculator"].requires_approval and not listed["echo"].requires_approval
        [asked] = await run(svc, "calculator", {"expression": "1+2"})
        assert isinstance(asked, ApprovalRequest)
        with pytest.raises(PermissionDenied):
            await run(svc, "text", {"text": "x", "operation": "count"})
        client_tools = {t.name for t in svc.list_tools(CLIENT)}
        assert "delete_file" not in client_tools and "text" in client_tools
        assert [t.name for t in svc.list_tools(CLIENT, "json")] == ["json_query"]
