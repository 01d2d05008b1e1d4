"""A property-based sweep: arbitrary request messages never crash a service.

Every RPC of every hivewire service (coordinator, agent, model, tool) gets
hypothesis-generated requests — any field set or not, any enum number (unknown ones
too), odd strings, NaN and infinite doubles, huge integers, nested messages, Struct
values — over real mTLS to real service processes, as an identity the policy lets in
(so the service's own validation is what answers). No call may end ``UNKNOWN`` or
``INTERNAL``, and every service answers its health check with SERVING afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory, struct_pb2
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivewire.agent.v1 import agent_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.model.v1 import model_pb2
from hivewire.services.runtime.channels import secure_channel
from hivewire.tool.v1 import tool_pb2
from tests.conftest import Pki
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
QUIET = {"HIVEWIRE_DISCOVERY": "static", "HIVEWIRE_EVENTS__ENABLED": "false"}
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# service full name -> (descriptor, the process key, the identity allowed to call it)
SERVICES: dict[str, tuple[descriptor.ServiceDescriptor, str, str]] = {
    d.full_name: (d, key, caller)
    for d, key, caller in (
        (coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"], "coordinator", "admin"),
        (agent_pb2.DESCRIPTOR.services_by_name["AgentService"], "agent", "coordinator"),
        (model_pb2.DESCRIPTOR.services_by_name["ModelService"], "model", "agent"),
        (tool_pb2.DESCRIPTOR.services_by_name["ToolService"], "tool", "agent"),
    )
}
METHODS = [
    (service, method.name) for service, (d, _, _) in SERVICES.items() for method in d.methods
]


# -- generating messages ------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_DOUBLE: st.floats(),
    F.TYPE_FLOAT: st.floats(width=32),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: st.text(max_size=40) | st.sampled_from(["", "calculate", "x" * 300]),
    F.TYPE_BYTES: st.binary(max_size=40),
}


def _value(field: F, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) | st.integers(-5, 1000)
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _SCALARS[field.type]


def _fill(target: message.Message, field: F, value: Any) -> None:
    if field.type == F.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


@st.composite
def _message(
    draw: Callable[[st.SearchStrategy[Any]], Any], desc: descriptor.Descriptor, depth: int
) -> message.Message:
    cls = _class_of(desc)
    msg = cls()
    if desc.full_name == "google.protobuf.Struct":
        assert isinstance(msg, struct_pb2.Struct)
        msg.update(draw(st.dictionaries(st.text(max_size=8), _json, max_size=4)))
        return msg
    if desc.full_name == "google.protobuf.Any" or depth > 4:
        return msg
    oneofs_done: set[str] = set()
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in oneofs_done:
            continue
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            entries = draw(
                st.dictionaries(_SCALARS[key_field.type], _value(value_field, depth), max_size=3)
            )
            target = getattr(msg, field.name)
            for k, v in entries.items():
                if value_field.type == F.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            items = draw(st.lists(_value(field, depth), max_size=3))
            target = getattr(msg, field.name)
            for item in items:
                if field.type == F.TYPE_MESSAGE:
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
        else:
            _fill(msg, field, draw(_value(field, depth)))
        if oneof is not None:
            oneofs_done.add(oneof.name)
    return msg


def messages(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[message.Message]:
    """Arbitrary instances of a message type."""
    return _message(desc, depth)


def _class_of(desc: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(desc)


# -- the mesh, on a loop of its own -------------------------------------------------------


class Loop:
    """An event loop on a thread: hypothesis drives sync examples, gRPC needs async."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Mesh:
    def __init__(self, loop: Loop, processes: dict[str, ServiceProcess], pki: Pki) -> None:
        self.loop = loop
        self.processes = processes
        self.channels: dict[str, grpc.aio.Channel] = {}
        for service, (_, key, caller) in SERVICES.items():
            self.channels[service] = loop.run(self._channel(processes[key].address, pki, caller))

    @staticmethod
    async def _channel(address: str, pki: Pki, caller: str) -> grpc.aio.Channel:
        return secure_channel(address, pki.files(caller))


@pytest.fixture(scope="module")
def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir: Path = tmp_path_factory.mktemp("sweep")
    loop = Loop()
    processes = {
        "coordinator": ServiceProcess(
            "hivewire.services.coordinator",
            workdir=workdir,
            certs_dir=pki.dir,
            identity="coordinator",
            env={**QUIET, "HIVEWIRE_COORDINATOR__DB_PATH": str(workdir / "c.db")},
        ),
        "model": ServiceProcess(
            "hivewire.services.model",
            workdir=workdir,
            certs_dir=pki.dir,
            identity="model",
            env={**QUIET, "HIVEWIRE_MODEL__DEFAULT_BACKEND": "deterministic"},
        ),
        "tool": ServiceProcess(
            "hivewire.services.tool",
            workdir=workdir,
            certs_dir=pki.dir,
            identity="tool",
            env={**QUIET, "HIVEWIRE_TOOL__PLUGINS": ""},
        ),
    }
    with contextlib.ExitStack() as stack:
        for process in processes.values():
            loop.run(process.__aenter__())
            stack.callback(lambda p=process: loop.run(p.__aexit__(None, None, None)))
        agent = ServiceProcess(
            "hivewire.services.agent",
            "hivewire.services.agent.examples.calculator:CalculatorAgent",
            workdir=workdir,
            certs_dir=pki.dir,
            identity="agent-calculator",
            env={
                **QUIET,
                "HIVEWIRE_AGENT__MODEL_ADDRESS": processes["model"].address,
                "HIVEWIRE_AGENT__TOOL_ADDRESS": processes["tool"].address,
            },
        )
        loop.run(agent.__aenter__())
        stack.callback(lambda: loop.run(agent.__aexit__(None, None, None)))
        processes["agent"] = agent
        mesh = Mesh(loop, processes, pki)
        stack.callback(lambda: [loop.run(c.close()) for c in mesh.channels.values()])
        yield mesh
    loop.close()


# -- the sweep ----------------------------------------------------------------------------


async def _call(
    channel: grpc.aio.Channel, method: descriptor.MethodDescriptor, request: message.Message
) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = _class_of(method.output_type)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": output.FromString,
    }
    try:
        if method.client_streaming and method.server_streaming:
            call: Any = channel.stream_stream(path, **kwargs)(timeout=3)
            await call.write(request)
            await call.done_writing()
            for _ in range(20):
                if await call.read() == grpc.aio.EOF:
                    break
            call.cancel()
        elif method.server_streaming:
            call = channel.unary_stream(path, **kwargs)(request, timeout=3)
            for _ in range(20):
                if await call.read() == grpc.aio.EOF:
                    break
            call.cancel()
        elif method.client_streaming:
            call = channel.stream_unary(path, **kwargs)(iter([request]), timeout=3)
            await call
        else:
            await channel.unary_unary(path, **kwargs)(request, timeout=3)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method_name"), METHODS)
def test_no_request_crashes_a_service(mesh: Mesh, service: str, method_name: str) -> None:
    desc, _, _ = SERVICES[service]
    method = desc.methods_by_name[method_name]
    channel = mesh.channels[service]

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(request=messages(method.input_type))
    def sweep(request: message.Message) -> None:
        code = mesh.loop.run(_call(channel, method, request))
        assert code not in BAD, f"{method.full_name} answered {code} to {request}"

    sweep()
    for process in mesh.processes.values():
        assert (
            mesh.loop.run(_serving(process.address, mesh)) == health_pb2.HealthCheckResponse.SERVING
        )


async def _serving(address: str, mesh: Mesh) -> int:
    channel = mesh.channels[next(iter(SERVICES))]
    for service, (_, key, _) in SERVICES.items():
        if mesh.processes[key].address == address:
            channel = mesh.channels[service]
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return reply.status
