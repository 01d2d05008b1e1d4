"""The README's "Writing an agent" example, served as written and given a task.

The Python block under that heading is written to a module, served with
`python -m hivewire.services.agent module:Shouter` next to a real coordinator and
model service (deterministic backend) over mTLS, and a `shout` task must succeed
with the upper-cased text, its progress and the model's streamed cheer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2 as S
from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer
from tests.support.e2e_mesh import coordinator_process, mesh_process, wait_for_agents
from tests.support.tool_mesh import MODEL_SERVICE, model_process, wait_until_registered

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_agent_source() -> str:
    text = README.read_text()
    section = text[text.index("## Writing an agent") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no python block under 'Writing an agent'"
    return match.group(1)


async def test_the_readme_agent_runs_a_task(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "readme_agent.py").write_text(readme_agent_source())
    async with NatsServer(tmp_path / "nats") as nats:
        common = {"workdir": tmp_path, "certs_dir": pki.dir, "nats_url": nats.url}
        async with (
            coordinator_process(db_path=tmp_path / "tasks.db", **common) as coordinator,
            model_process(**common),
        ):
            await wait_until_registered(nats.url, [MODEL_SERVICE])
            async with mesh_process(
                "hivewire.services.agent",
                "readme_agent:Shouter",
                "--identity",
                "agent",
                name="shouter",
                env={"PYTHONPATH": str(tmp_path)},
                **common,
            ):
                channel = secure_channel(coordinator.address, pki.files("client"))
                try:
                    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                    await wait_for_agents(stub, 1)
                    spec = C.TaskSpec(capability="shout", input=S.Payload(text="hello mesh"))
                    events = [
                        r.event async for r in stub.StreamTask(C.StreamTaskRequest(spec=spec))
                    ]
                finally:
                    await channel.close()
    finished = events[-1].finished
    assert finished.state == S.TASK_STATE_SUCCEEDED, finished
    assert finished.output.text == "HELLO MESH"
    assert any(e.progress.step == "shout" for e in events if e.HasField("progress"))
    cheer = "".join(e.partial.content.text for e in events if e.HasField("partial"))
    assert "HELLO MESH" in cheer  # the deterministic backend quotes its prompt
