"""`hivewire agent serve` as a real process: mTLS service, embedded registry, SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from hivewire.discovery import Instance, open_registry
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.integration.test_agent_helpers import Coordinator, assignment

CALCULATOR = "hivewire.services.agent.examples.calculator:CalculatorAgent"
HIVEWIRE = str(Path(sys.executable).with_name("hivewire"))


async def test_serve_registers_answers_and_deregisters_on_sigterm(
    pki: Pki, nats_server: NatsServer, tmp_path: Path
) -> None:
    proc = ServiceProcess(
        "hivewire",
        workdir=tmp_path,
        name="agent-calculator",
        certs_dir=pki.dir,
        nats_url=nats_server.url,
        env={"HIVEWIRE_DISCOVERY": "nats"},
        argv=[HIVEWIRE, "agent", "serve", CALCULATOR, "--max-concurrency", "5"],
    )
    async with open_registry("nats", nats_url=nats_server.url) as registry:
        await proc.start()
        try:

            async def registered() -> Instance:
                found = await registry.resolve("hivewire-agent", tag="calculate")
                assert len(found) == 1
                return found[0]

            instance = await eventually(registered, timeout=15)
            assert (instance.address, instance.port) == ("127.0.0.1", proc.port)
            assert set(instance.tags) == {"calculate", "solve"}
            assert instance.meta["name"] == "calculator"
            assert instance.meta["version"] == "1.0.0"
            assert instance.meta["max_concurrency"] == "5"
            # The default identity is the agent's own certificate.
            assert instance.meta["spiffe_id"] == "spiffe://hivewire.local/agent/calculator"
            assert instance.meta["tls_server_name"] == "calculator.agent.hivewire.local"
            # No explicit instance name: replicas on one host differ by port and coexist.
            assert "instance_name" not in instance.meta
            assert instance.instance_id.startswith("calculator-")

            coordinator = Coordinator(instance.endpoint, pki.files("coordinator"))
            try:
                described = await coordinator.describe()
                assert described.agent_id == instance.instance_id
                assert described.card.max_concurrency == 5
                # No tool service is registered: the calculator evaluates by itself.
                ex = coordinator.execute()
                await ex.send(assignment("calculate", text="6 * 7"))
                final = await ex.finish(timeout=30)
                assert final.result.output.json["results"][0]["value"] == 42
                assert final.result.output.json["engine"] == "local"
            finally:
                await coordinator.close()

            assert proc.metrics_port is not None
            async with httpx.AsyncClient() as http:
                page = await http.get(f"http://127.0.0.1:{proc.metrics_port}/metrics")
            assert (
                'hivewire_agent_executions_total{capability="calculate",outcome="succeeded"} 1.0'
                in page.text
            )
            assert "hivewire_agent_in_flight 0.0" in page.text
        finally:
            code = await proc.terminate()
        assert code == 0, proc.log_tail()

        async def deregistered() -> None:
            assert await registry.resolve("hivewire-agent") == []

        await eventually(deregistered, timeout=10)


async def test_python_m_serve_with_flags(pki: Pki, tmp_path: Path) -> None:
    proc = ServiceProcess(
        "hivewire.services.agent",
        CALCULATOR,
        "--name",
        "calc-two",
        "--identity",
        "agent",
        "--no-register",
        "--tool-address",
        "127.0.0.1:1",
        "--model-address",
        "127.0.0.1:1",
        workdir=tmp_path,
        certs_dir=pki.dir,
        env={"HIVEWIRE_EVENTS__ENABLED": "false"},
    )
    async with proc:
        coordinator = Coordinator(proc.address, pki.files("coordinator"))
        try:
            card = (await coordinator.describe()).card
            assert card.name == "calc-two"
            assert card.max_concurrency == 16
        finally:
            await coordinator.close()
    assert proc.returncode == 0, proc.log_tail()


async def test_serve_rejects_a_target_that_is_not_an_agent(tmp_path: Path) -> None:
    cases = (
        ("no_such_module_here:Agent", "cannot import"),
        ("hivewire.services.agent.sdk:Payload", "not an Agent"),
        ("missing-colon", "module:Class"),
    )
    for index, (target, message) in enumerate(cases):
        proc = ServiceProcess(
            "hivewire.services.agent", target, workdir=tmp_path, name=f"bad-{index}"
        )
        await proc.start(wait_ready=False)
        assert await proc.wait(timeout=30) == 2
        assert message in proc.stderr_path.read_text(), proc.log_tail()


async def test_replicas_on_one_host_register_side_by_side(
    pki: Pki, nats_server: NatsServer
) -> None:
    from hivewire.services.agent.examples.calculator import CalculatorAgent
    from tests.integration.test_agent_helpers import agent_settings, serve_in_process

    settings = agent_settings(pki.dir, identity="agent-calculator", registration=True).model_copy(
        update={"discovery": "nats", "nats_url": nats_server.url}
    )
    async with (
        open_registry("nats", nats_url=nats_server.url) as registry,
        serve_in_process(CalculatorAgent(), settings) as first,
        serve_in_process(CalculatorAgent(), settings) as second,
    ):

        async def both() -> None:
            found = await registry.resolve("hivewire-agent", tag="solve")
            assert sorted(i.port for i in found) == sorted([first.port, second.port])

        await eventually(both, timeout=10)
    async with open_registry("nats", nats_url=nats_server.url) as registry:
        # Leaving the block deregistered both.
        assert await registry.resolve("hivewire-agent") == []
