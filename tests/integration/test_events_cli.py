"""``hivewire events`` run as a real command against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from google.protobuf import json_format
from typer.testing import CliRunner

from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.cli.main import app
from hivewire.services.runtime.events import EventPublisher
from tests.helpers import NatsServer, eventually

HIVEWIRE = str(Path(sys.executable).parent / "hivewire")


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE, "events", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def publish_sample(url: str) -> None:
    async with EventPublisher(url, source="coordinator/cli-test") as publisher:
        publisher.publish(
            "task.created",
            subject="task-a",
            data=events_pb2.TaskEventData(task_id="task-a", capability="summarize"),
            task_sequence=1,
            correlation_id="cid-a",
        )
        publisher.publish(
            "model.request_completed",
            subject="call-1",
            data=events_pb2.ModelEventData(model="tiny", backend="deterministic", task_id="task-a"),
            correlation_id="cid-a",
        )
        publisher.publish(
            "task.failed",
            subject="task-b",
            data=events_pb2.TaskEventData(
                task_id="task-b",
                state=common_pb2.TASK_STATE_FAILED,
                error=common_pb2.ErrorDetail(reason="AGENT_CRASHED", message="agent exited"),
            ),
            task_sequence=3,
            correlation_id="cid-b",
        )
        assert await publisher.flush(10)


async def test_history_human_and_json_with_filters(nats_server: NatsServer) -> None:
    await publish_sample(nats_server.url)
    url = ["--nats-url", nats_server.url]

    code, out, err = await run_cli(*url)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert " #1 task.created " in lines[0] and "capability=summarize" in lines[0]
    assert "model=tiny backend=deterministic" in lines[1]
    assert "task-b seq=3 state=failed error=AGENT_CRASHED: agent exited cid=cid-b" in lines[2]

    code, out, err = await run_cli(*url, "--json")
    assert code == 0, err
    events = [json_format.Parse(line, events_pb2.Event()) for line in out.splitlines()]
    assert [e.type for e in events] == ["task.created", "model.request_completed", "task.failed"]
    assert json.loads(out.splitlines()[2])["task"]["error"]["reason"] == "AGENT_CRASHED"

    # The filter matrix runs the same command in-process (a thread, for its own
    # asyncio.run): one interpreter start per case would dominate the test's time.
    runner = CliRunner()

    async def types(*args: str) -> list[str]:
        result = await asyncio.to_thread(runner.invoke, app, ["events", *url, "--json", *args])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["type"] for line in result.stdout.splitlines()]

    assert await types("--category", "task") == ["task.created", "task.failed"]
    assert await types("--type", "task.failed") == ["task.failed"]
    assert await types("--task-id", "task-a") == ["task.created", "model.request_completed"]
    assert await types("--correlation-id", "cid-b") == ["task.failed"]
    assert await types("--from-seq", "2") == ["model.request_completed", "task.failed"]
    assert await types("--since", "1h", "--limit", "1") == ["task.created"]
    assert await types("--since", "2999-01-01T00:00:00Z") == []


async def test_follow_prints_live_events_and_stops_cleanly_on_ctrl_c(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await publish_sample(nats_server.url)
    out_path = tmp_path / "follow.out"
    err_path = tmp_path / "follow.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            HIVEWIRE,
            "events",
            "--follow",
            "--from-seq",
            "3",
            "--nats-url",
            nats_server.url,
            stdout=out,
            stderr=err,
        )
    try:
        await eventually(lambda: "task.failed" in out_path.read_text(), timeout=30)
        async with EventPublisher(nats_server.url, source="svc/live") as publisher:
            publisher.publish(
                "agent.health_changed",
                subject="agent-9",
                data=events_pb2.AgentEventData(name="researcher", reason="probe failed"),
            )
            assert await publisher.flush(10)
        await eventually(lambda: "agent.health_changed" in out_path.read_text(), timeout=30)
        assert proc.returncode is None  # still following
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0
    assert err_path.read_text() == ""
    lines = out_path.read_text().splitlines()
    assert len(lines) == 2
    assert "name=researcher healthy=false reason='probe failed'" in lines[1]


async def test_clear_errors(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        code, out, err = await run_cli("--nats-url", server.url)
        assert code == 1
        assert err.strip() == (
            "Error: event stream HIVEWIRE_EVENTS does not exist yet "
            "(no service has published an event)"
        )
    finally:
        await server.stop()
    code, out, err = await run_cli("--nats-url", server.url)
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"Error: cannot reach NATS at {server.url}")

    code, _, err = await run_cli("--since", "1h", "--from-seq", "3", "--nats-url", server.url)
    assert code == 2
    assert "--since or --from-seq" in err
    code, _, err = await run_cli("--category", "billing", "--nats-url", server.url)
    assert code == 2
    assert "unknown category" in err
