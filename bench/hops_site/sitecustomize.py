"""Timestamps along one task's path, for ``bench/hops.py`` (never in a service's own code).

On ``PYTHONPATH`` of the benchmark mesh's services with ``BENCH_HOPS_DIR`` set,
this wraps a few functions of the coordinator and the agent as their modules load and
records ``(monotonic ns, thread CPU ns, thread, label, task, detail)`` at each; every
event-loop turn's start is recorded too. ``SIGUSR1`` writes them to
``<dir>/<identity>-<pid>.tsv`` (and ``.turns``). ``CLOCK_MONOTONIC`` is one clock for
every process of the machine, so the records of all processes line up.
"""

from __future__ import annotations

import array
import importlib.abc
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

_DIR = os.environ.get("BENCH_HOPS_DIR")
_records: list[tuple[int, int, int, str, str, str]] = []
_turns: list[int] = []
_mono = time.monotonic_ns
_cpu = time.thread_time_ns


def rec(label: str, task: str = "", detail: str = "") -> None:
    """Record one point."""
    _records.append((_mono(), _cpu(), threading.get_ident(), label, task, detail))


def _dump(*_: object) -> None:
    assert _DIR is not None
    # The launcher names each service's ports file after it (run/agent-0.json...).
    stem = os.path.splitext(os.path.basename(os.environ.get("HIVEWIRE_PORTS_FILE", "")))[0]
    name = f"{stem or 'process'}-{os.getpid()}"
    with open(os.path.join(_DIR, f"{name}.tsv"), "w") as out:
        for record in list(_records):
            out.write("\t".join(str(x) for x in record) + "\n")
    with open(os.path.join(_DIR, f"{name}.turns"), "wb") as out:
        array.array("q", _turns).tofile(out)


def _ids(items: Any, kind: Callable[[Any], str]) -> str:
    return ",".join(f"{item.task_id}:{kind(item)}" for item in items)


def _loop(module: ModuleType) -> None:
    run_once = module.BaseEventLoop._run_once
    turn = _turns.append

    def _run_once(self: Any) -> None:
        turn(_mono())
        run_once(self)

    module.BaseEventLoop._run_once = _run_once


def _servicer(module: ModuleType) -> None:
    cls = module.CoordinatorServicer
    stream_task = cls.StreamTask

    async def instrumented(self: Any, request: Any, context: Any) -> Any:
        entered = (_mono(), _cpu(), threading.get_ident())
        first = True
        async for response in stream_task(self, request, context):
            event = response.event
            if first:
                _records.append((*entered, "handler", event.task_id, ""))
                first = False
            rec("yield", event.task_id, f"{event.sequence}:{event.WhichOneof('kind')}")
            yield response
            rec("written", event.task_id, str(event.sequence))

    cls.StreamTask = instrumented


def _journal(module: ModuleType) -> None:
    cls = module.Journal
    emit, committed = cls.emit, cls._committed

    def instrumented_emit(self: Any, rt: Any, **kw: Any) -> Any:
        future = emit(self, rt, **kw)
        rec("emit", rt.record.task_id, str(rt.record.last_sequence))
        return future

    def instrumented_committed(self: Any, rt: Any, event: Any, *args: Any) -> Any:
        rec("committed", rt.record.task_id, str(event.sequence))
        return committed(self, rt, event, *args)

    cls.emit, cls._committed = instrumented_emit, instrumented_committed


def _store(module: ModuleType) -> None:
    cls = module.SqliteTaskStore
    apply = cls._apply

    def instrumented(self: Any, conn: Any, batch: Any) -> Any:
        ids = ",".join(f"{e.task_id}:{e.sequence}" for w in batch for e in w.events)
        rec("tx_start", "", ids)
        try:
            return apply(self, conn, batch)
        finally:
            rec("tx_end", "", ids)

    cls._apply = instrumented


def _coordinator_link(module: ModuleType) -> None:
    cls = module.AgentLink
    init = cls.__init__

    def instrumented(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        call = self._call
        write, read = call.write, call.read

        def frame_kind(frame: Any) -> str:
            return str(frame.request.WhichOneof("kind")) if frame.HasField("request") else "close"

        async def timed_write(request: Any) -> Any:
            ids = _ids(request.frames, frame_kind)
            rec("link_write", "", ids)
            result = await write(request)
            rec("link_written", "", ids)
            return result

        async def timed_read() -> Any:
            message = await read()
            responses = getattr(message, "responses", ())
            rec("link_read", "", _ids(responses, lambda r: str(r.WhichOneof("kind"))))
            return message

        call.write, call.read = timed_write, timed_read

    cls.__init__ = instrumented


def _service(module: ModuleType) -> None:
    cls = module.Coordinator
    on_message = cls._on_agent_message

    def instrumented(self: Any, rt: Any, attempt: Any, message: Any) -> Any:
        rec("applied", rt.record.task_id, str(message.WhichOneof("kind")))
        return on_message(self, rt, attempt, message)

    cls._on_agent_message = instrumented


def _agent_link(module: ModuleType) -> None:
    cls = module.LinkSession
    handle, responses = cls.handle, cls.responses

    async def instrumented_handle(self: Any, frame: Any) -> None:
        kind = frame.request.WhichOneof("kind") if frame.HasField("request") else "close"
        rec("agent_frame", frame.task_id, str(kind))
        await handle(self, frame)

    async def instrumented_responses(self: Any) -> Any:
        async for message in responses(self):
            ids = _ids(message.responses, lambda r: str(r.WhichOneof("kind")))
            rec("agent_send", "", ids)
            yield message
            rec("agent_sent", "", ids)

    cls.handle, cls.responses = instrumented_handle, instrumented_responses


def _tracing(module: ModuleType) -> None:
    cls = module._ServerInterceptor
    intercept = cls.intercept_service

    async def instrumented(self: Any, continuation: Any, details: Any) -> Any:
        rec("outer", "", str(details.method))
        return await intercept(self, continuation, details)

    cls.intercept_service = instrumented


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "hivewire.services.runtime.tracing": _tracing,
    "asyncio.base_events": _loop,
    "hivewire.services.coordinator.servicer": _servicer,
    "hivewire.services.coordinator.journal": _journal,
    "hivewire.services.coordinator.sqlite_store": _store,
    "hivewire.services.coordinator.link": _coordinator_link,
    "hivewire.services.coordinator.service": _service,
    "hivewire.services.agent.link": _agent_link,
}


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the functions above as their modules are executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


if _DIR:
    signal.signal(signal.SIGUSR1, _dump)
    if "asyncio.base_events" in sys.modules:
        _loop(sys.modules["asyncio.base_events"])
    sys.meta_path.insert(0, _Finder())
