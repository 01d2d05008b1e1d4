"""Options gathered in a TypedDict (``**options: Unpack[...]``) still refuse a misspelt
keyword at once, as the explicit keyword parameters they replaced did.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import cast

import grpc
import pytest

from hivewire.services.agent.clients import TaskModel
from hivewire.services.agent.sdk import ExecutionSink, TaskContext, TaskInfo
from hivewire.services.base.keywords import check_keywords
from hivewire.services.model.client import ModelClient
from hivewire.services.runtime.errors import HivewireError
from hivewire.services.tool.client import ToolClient
from hivewire.services.tool.sdk import tool


def test_check_keywords_names_the_first_unknown_keyword() -> None:
    check_keywords("f", {"a": 1}, {"a", "b"})
    with pytest.raises(TypeError, match=r"^f\(\) got an unexpected keyword argument 'c'$"):
        check_keywords("f", {"a": 1, "c": 2}, {"a", "b"})


def test_the_tool_decorator_refuses_an_unknown_option() -> None:
    with pytest.raises(TypeError, match="tool\\(\\) got an unexpected keyword argument 'nme'"):
        tool(nme="x")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    # Never connected: every call below is refused before it is made.
    async with grpc.aio.insecure_channel("127.0.0.1:9") as opened:
        yield opened


async def test_the_model_client_refuses_an_unknown_keyword(channel: grpc.aio.Channel) -> None:
    client = ModelClient(channel)
    with pytest.raises(TypeError, match="ModelClient.chat\\(\\) got .* 'temprature'"):
        client.chat([("user", "hi")], temprature=0.2)
    with pytest.raises(TypeError, match="ModelClient.generate\\(\\) got .* 'max_token'"):
        client.generate("hi", max_token=5)
    with pytest.raises(TypeError, match="ModelClient.embed\\(\\) got .* 'temperature'"):
        await client.embed(["hi"], temperature=0.2)


async def test_the_tool_client_refuses_an_unknown_keyword(channel: grpc.aio.Channel) -> None:
    client = ToolClient(channel)
    with pytest.raises(TypeError, match="ToolClient.invoke\\(\\) got .* 'taskid'"):
        await client.invoke("calculator", {"expression": "1"}, taskid="t")


class _Endpoint:
    async def channel(self) -> grpc.aio.Channel:
        raise AssertionError("no call may be made")

    def failed(self, err: HivewireError) -> None:
        raise AssertionError("no call may be made")


def test_ctx_model_refuses_an_unknown_sampling_keyword() -> None:
    ctx = TaskContext(
        TaskInfo(task_id="t", attempt=1, capability="c"),
        cast(ExecutionSink, object()),  # nothing is reported before the call is refused
        logger=logging.getLogger("test"),
    )
    model = TaskModel(ctx, _Endpoint(), default_timeout=5.0)
    with pytest.raises(TypeError, match="TaskModel.stream\\(\\) got .* 'temprature'"):
        model.stream("hi", temprature=0.1)
    with pytest.raises(TypeError, match="TaskModel.stream_chat\\(\\) got .* 'sed'"):
        model.stream_chat([("user", "hi")], sed=1)
