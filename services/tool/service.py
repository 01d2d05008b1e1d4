"""The tool service's domain: list tools, and run one call from policy check to result.

A call goes through, in order: the policy (``PERMISSION_DENIED`` if the caller may not
call that name: checked first, so forbidden callers learn nothing about which tools
exist), the registry (``NOT_FOUND``), the tool's JSON Schema (``INVALID_ARGUMENT`` with
one field violation per failing path), the approval check (an ``ApprovalRequest`` as
the stream's last message, or ``PERMISSION_DENIED`` unless the approval carries the
coordinator's valid, unused grant for this task, tool and digest: runtime/grants.py),
the concurrency limit (``RESOURCE_EXHAUSTED``), then the tool itself, bounded by the
smallest of the caller's deadline, the tool's own cap (or the service default) and the
service's hard cap (``DEADLINE_EXCEEDED``, reason ``TOOL_TIMEOUT``). A tool
that raises becomes a classified error result and the service carries on.

No gRPC here: the servicer translates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.convert import error_info
from hivewire.services.runtime.errors import (
    DeadlineExceeded,
    FieldViolation,
    HivewireError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from hivewire.services.runtime.grants import ApprovalVerifier, GrantLedger
from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate
from hivewire.services.runtime.version import hivewire_version
from hivewire.services.tool.audit import AuditedCall, AuditRecord, AuditTrail, ToolEvents
from hivewire.services.tool.builtins import Builtins
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    InvokeEvent,
    ToolCall,
    ToolInfo,
    ToolOutcome,
    ToolSource,
)
from hivewire.services.tool.mcp_bridge import McpBridge
from hivewire.services.tool.policy import PolicyStore
from hivewire.services.tool.registry import (
    FunctionTool,
    ThreadRunner,
    Tool,
    ToolRegistry,
    load_plugins,
)
from hivewire.services.tool.schema import cap_result, cap_text, violations
from hivewire.services.tool.sdk import ToolContext, ToolError, arguments_digest
from hivewire.services.tool.settings import ToolSettings

logger = logging.getLogger(__name__)

_PROGRESS_BACKLOG = 64
"""Progress reports waiting to be sent; beyond it, new ones are dropped (coalescing)."""

_CANCEL_GRACE = 2.0
"""Seconds a cancelled coroutine tool gets to unwind before it is abandoned."""

_MAX_CRASH_MESSAGE = 1000

_DONE = object()


def _failure_from_error(err: HivewireError) -> ErrorInfo:
    return ErrorInfo(
        code=err.code.name,
        reason=err.reason,
        message=err.message,
        retryable=err.retryable,
        metadata=dict(err.metadata),
    )


@dataclasses.dataclass(eq=False)
class ToolService:
    """Lists tools and runs calls against the registry, the policy and the limits.

    Attributes:
        settings: Limits and timeouts.
        registry: The tools (filled before the service is created).
        policy: Who may call what.
        audit: Where calls are logged, counted and published.
        bridge: The MCP bridge, if any (for status only).
        approvals: Verifies the coordinator's signed approvals (None: every
            approval is refused).
    """

    settings: ToolSettings
    _: dataclasses.KW_ONLY
    registry: ToolRegistry
    policy: PolicyStore
    audit: AuditTrail
    bridge: McpBridge | None = None
    approvals: ApprovalVerifier | None = None
    _running: int = dataclasses.field(default=0, init=False, repr=False)

    @property
    def running(self) -> int:
        """Calls running now."""
        return self._running

    def list_tools(self, caller: str, name_prefix: str = "") -> list[ToolInfo]:
        """Tools ``caller`` may call, sorted by name.

        Args:
            caller: The caller's SPIFFE id.
            name_prefix: Only names starting with this.

        Returns:
            The tools, with ``requires_approval`` as it applies to this caller.
        """
        policy = self.policy.policy
        listed = []
        for tool in self.registry.tools():
            if not tool.name.startswith(name_prefix):
                continue
            decision = policy.decide(caller, tool.name)
            if not decision.allowed:
                continue
            info = tool.info
            if decision.requires_approval and not info.requires_approval:
                info = dataclasses.replace(info, requires_approval=True)
            listed.append(info)
        return listed

    async def _verify_approval(
        self, approval: ApprovalGrant, call: ToolCall, digest: str
    ) -> common_pb2.ApprovalClaims:
        if self.approvals is None:
            raise PermissionDenied(
                f"approvals for {call.tool_name} cannot be verified: no mesh CA configured",
                reason="APPROVAL_UNTRUSTED",
                metadata={"tool": call.tool_name},
            )
        return await self.approvals.verify_once(
            approval.signed,
            task_id=call.task_id,
            tool_name=call.tool_name,
            arguments_digest=digest,
            request_id=approval.request_id,
        )

    def _limit(self, tool: Tool, caller_timeout: float | None) -> float:
        limit = min(tool.timeout or self.settings.default_timeout, self.settings.max_timeout)
        if caller_timeout is not None:
            limit = min(limit, caller_timeout)
        return max(limit, 0.0)

    async def invoke(self, call: ToolCall) -> AsyncIterator[InvokeEvent]:
        """Run one call, yielding its progress and then its outcome.

        Args:
            call: The call (arguments already JSON-normalized).

        Yields:
            :class:`ProgressUpdate` messages, then exactly one :class:`ToolOutcome`,
            :class:`ErrorInfo` or :class:`ApprovalRequest`.

        Raises:
            PermissionDenied: Caller not allowed (``TOOL_NOT_ALLOWED``) or the approval
                is not a valid unused grant for this call (``APPROVAL_*``, see
                :meth:`ApprovalVerifier.verify`).
            NotFound: No such tool (``TOOL_NOT_FOUND``).
            InvalidArgument: Arguments break the schema (``INVALID_TOOL_ARGUMENTS``).
            ResourceExhausted: Too many calls at once (``TOO_MANY_TOOL_CALLS``).
            DeadlineExceeded: The tool did not finish in time (``TOOL_TIMEOUT``).
        """
        started = time.monotonic()
        call_id = call.call_id or uuid.uuid4().hex
        name = call.tool_name
        known = name in self.registry
        digest = ""

        def record(outcome: str, error: ErrorInfo | None) -> AuditRecord:
            return AuditRecord(
                AuditedCall(call_id, name, call.caller, call.task_id, digest),
                outcome=outcome,
                duration=time.monotonic() - started,
                error=error,
                known_tool=known,
            )

        def refuse(err: HivewireError, outcome: str = "error") -> HivewireError:
            self.audit.finished(record(outcome, _failure_from_error(err)), started=False)
            return err

        try:
            digest = arguments_digest(call.arguments)
        except (ValueError, TypeError) as exc:
            raise refuse(
                InvalidArgument(violations=[FieldViolation("arguments", str(exc))])
            ) from None
        decision = self.policy.policy.decide(call.caller, name)
        if not decision.allowed:
            who = call.caller or "a caller without a SPIFFE id"
            raise refuse(
                PermissionDenied(
                    f"{who} may not call tool {name!r}",
                    reason="TOOL_NOT_ALLOWED",
                    metadata={"tool": name},
                ),
                "denied",
            )
        tool = self.registry.get(name)
        if tool is None:
            raise refuse(NotFound("tool", name, reason="TOOL_NOT_FOUND"))
        found = violations(tool.validator, call.arguments)
        if found:
            raise refuse(
                InvalidArgument(
                    f"arguments of {name} do not match its schema: "
                    + "; ".join(f"{v.field}: {v.description}" for v in found),
                    found,
                    reason="INVALID_TOOL_ARGUMENTS",
                )
            )
        if tool.info.requires_approval or decision.requires_approval:
            approval = call.approval
            if approval is None:
                self.audit.finished(record("approval_required", None), started=False)
                yield ApprovalRequest(
                    tool_name=name,
                    arguments_digest=digest,
                    prompt=tool.approval_prompt(call.arguments),
                )
                return
            if not approval.request_id:
                raise refuse(
                    InvalidArgument(
                        violations=[
                            FieldViolation("approval.request_id", "required with an approval")
                        ]
                    )
                )
            if approval.in_process and approval.arguments_digest == digest:
                # Asked of the person by this service's own MCP server: nothing to verify.
                logger.info(
                    "call %s of %s approved by %s (request %s, in this service)",
                    call_id,
                    name,
                    approval.approved_by,
                    approval.request_id,
                )
            else:
                try:
                    claims = await self._verify_approval(approval, call, digest)
                except PermissionDenied as err:
                    raise refuse(err, "denied") from None
                except Unavailable as err:
                    raise refuse(err) from None
                logger.info(
                    "call %s of %s approved by %s (request %s, grant %s)",
                    call_id,
                    name,
                    claims.approved_by,
                    approval.request_id,
                    claims.grant_id,
                )
        if self._running >= self.settings.max_concurrent_calls:
            raise refuse(
                ResourceExhausted(
                    f"{self._running} tool calls are running; try again shortly",
                    retry_after=0.5,
                    reason="TOO_MANY_TOOL_CALLS",
                )
            )
        async for event in self._run(tool, call, call_id, digest, record):
            yield event

    async def _run(
        self,
        tool: Tool,
        call: ToolCall,
        call_id: str,
        digest: str,
        record: Callable[[str, ErrorInfo | None], AuditRecord],
    ) -> AsyncIterator[InvokeEvent]:
        loop = asyncio.get_running_loop()
        limit = self._limit(tool, call.timeout)
        deadline = loop.time() + limit
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def push(fraction: float, step: str, message: str) -> None:
            if queue.qsize() < _PROGRESS_BACKLOG:
                queue.put_nowait(ProgressUpdate(fraction, step, message))

        def on_progress(fraction: float, step: str, message: str) -> None:
            # Tools report from the loop or from their own thread.
            try:
                loop.call_soon_threadsafe(push, fraction, step, message)
            except RuntimeError:
                pass

        ctx = ToolContext(
            tool_name=tool.name,
            call_id=call_id,
            task_id=call.task_id,
            caller=call.caller,
            correlation_id=call.correlation_id,
            deadline=time.monotonic() + limit,
            on_progress=on_progress,
        )
        self._running += 1
        self.audit.invoked(AuditedCall(call_id, tool.name, call.caller, call.task_id, digest))
        task = asyncio.create_task(tool.call(call.arguments, ctx), name=f"tool-{tool.name}")
        task.add_done_callback(lambda _: queue.put_nowait(_DONE))
        finished = False
        try:
            while True:
                try:
                    # The timeout wraps only the wait, never a yield: a timeout that fired
                    # while the consumer holds the generator would cancel the wrong code.
                    async with asyncio.timeout_at(deadline):
                        item = await queue.get()
                except TimeoutError:
                    err = DeadlineExceeded(
                        f"tool {tool.name} did not finish within {limit:.3g}s",
                        reason="TOOL_TIMEOUT",
                        metadata={"tool": tool.name, "timeout_seconds": f"{limit:.3f}"},
                    )
                    finished = True
                    self.audit.finished(record("timeout", _failure_from_error(err)), started=True)
                    raise err from None
                if item is _DONE:
                    break
                yield item
            finished = True
            event = self._outcome(tool, task)
            outcome = "ok" if isinstance(event, ToolOutcome) else "error"
            failure = event if isinstance(event, ErrorInfo) else None
            if isinstance(event, HivewireError):
                self.audit.finished(record("error", _failure_from_error(event)), started=True)
                raise event
            self.audit.finished(record(outcome, failure), started=True)
            yield event
        finally:
            self._running -= 1
            if not task.done():
                ctx.cancel()
                task.cancel()
                # A coroutine tool gets a moment to unwind; one that ignores cancellation
                # is abandoned rather than allowed to hold up the call's end.
                await asyncio.wait([task], timeout=_CANCEL_GRACE)
            if not finished:
                cancelled = ErrorInfo(
                    code="CANCELLED", reason="CANCELLED", message="call cancelled"
                )
                self.audit.finished(record("error", cancelled), started=True)

    def _outcome(
        self, tool: Tool, task: asyncio.Task[tuple[dict[str, Any], str]]
    ) -> ToolOutcome | ErrorInfo | HivewireError:
        if task.cancelled():
            return ErrorInfo(
                code="CANCELLED", reason="TOOL_CANCELLED", message=f"{tool.name} cancelled itself"
            )
        exc = task.exception()
        if exc is None:
            result, text = task.result()
            max_bytes = self.settings.max_result_bytes
            capped, cut_result = cap_result(result, max_bytes)
            capped_text, cut_text = cap_text(text, max_bytes)
            return ToolOutcome(result=capped, text=capped_text, truncated=cut_result or cut_text)
        if isinstance(exc, ToolError):
            return error_info(exc)
        if isinstance(exc, HivewireError):
            return exc
        logger.warning("tool %s crashed", tool.name, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
        return ErrorInfo(
            code="INTERNAL",
            reason="TOOL_CRASHED",
            message=message[:_MAX_CRASH_MESSAGE],
            metadata={"exception": type(exc).__name__},
        )


@contextlib.asynccontextmanager
async def open_tool_service(
    settings: ToolSettings,
    *,
    publisher: ToolEvents | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    mesh_ca: Path | None = None,
    grant_ledger: GrantLedger | None = None,
) -> AsyncIterator[ToolService]:
    """Build the service: built-ins, plugins, MCP servers, policy and audit trail.

    Args:
        settings: The tool settings.
        publisher: Where ``tool.*`` events go (None: logs and metrics only).
        http_transport: Transport for ``http_fetch`` (tests may inject one).
        mesh_ca: The mesh CA bundle that approval grants must chain to (None: tools
            that need approval cannot run).
        grant_ledger: Where grants are used up for every tool service of the mesh
            (None: single use within this process only).

    Yields:
        The ready service; leaving the block closes HTTP clients and MCP sessions.

    Raises:
        hivewire.services.tool.policy.PolicyError: The policy file is invalid.
    """
    policy = PolicyStore(settings.policy_file)
    threads = ThreadRunner(settings.max_sync_threads)
    registry = ToolRegistry(disabled=settings.disabled_tools)
    version = hivewire_version()
    async with Builtins(settings, transport=http_transport) as builtins:
        for definition in builtins.definitions():
            registry.add(
                FunctionTool(
                    definition, source=ToolSource.BUILTIN, threads=threads, version=version
                )
            )
        for plugin_tool in load_plugins(settings.plugins, threads):
            registry.add(plugin_tool)
        async with McpBridge(list(settings.mcp_servers), registry) as bridge:
            logger.info(
                "%d tool(s): %s", len(registry), ", ".join(t.name for t in registry.tools())
            )
            yield ToolService(
                settings,
                registry=registry,
                policy=policy,
                audit=AuditTrail(publisher),
                bridge=bridge,
                approvals=(
                    ApprovalVerifier(mesh_ca, settings.approval_issuers, ledger=grant_ledger)
                    if mesh_ca is not None
                    else None
                ),
            )
