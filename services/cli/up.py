"""``hivewire up``: start the whole mesh, show a demo task live, run until Ctrl-C.

Each service is its own process on a fixed port (see the README's port table). Once
all of them are SERVING, the endpoints go to ``.hivewire/endpoints.json``, a demo task
runs with live progress, and a copy-pasteable grpcurl command is printed. Ctrl-C (or
SIGTERM) stops every process, agents first, nats-server last; children also die with
this process if it is killed, so nothing is left behind.

One coordinator on SQLite by default; ``--coordinators N --store jetstream`` runs N
coordinators on their own ports over the mesh's NATS JetStream. A coordinator that
dies is started again; a crash loop, or any other process dying, stops the mesh with
the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.cli.tasks import EventView, follow
from hivewire.services.mesh.launcher import Launcher, LaunchError, ManagedProcess
from hivewire.services.mesh.up import (
    EXAMPLE_AGENTS,
    MAX_COORDINATORS,
    Mesh,
    MeshOptions,
    MeshOptionsError,
    Store,
)
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.tls import TlsFiles

app = typer.Typer()

DEMO_CAPABILITY = "research"
DEMO_QUESTION = "How does hivewire keep a task's progress visible when a client reconnects?"
DEMO_INPUT: dict[str, Any] = {
    "question": DEMO_QUESTION,
    "documents": [
        "The coordinator stores every task event with a per-task sequence number in SQLite. "
        "A client that reconnects calls WatchTask with the last sequence it saw and receives "
        "every later event exactly once, in order, before the live ones.",
        "Agents stream progress, partial results and tool calls over a bidirectional Execute "
        "stream; the coordinator fans every event out to all watchers of the task.",
    ],
}
EXIT_START_FAILED = 1
EXIT_USAGE = 2


async def _run_demo(mesh: Mesh, console: Console) -> int:
    tls = mesh.tls_paths()
    files = TlsFiles(ca=Path(tls["ca"]), cert=Path(tls["cert"]), key=Path(tls["key"]))
    spec = coordinator_pb2.TaskSpec(
        capability=DEMO_CAPABILITY,
        priority=common_pb2.PRIORITY_HIGH,
        metadata=common_pb2.RequestMetadata(source="hivewire-up-demo"),
    )
    spec.input.json.update(DEMO_INPUT)
    spec.input.text = DEMO_QUESTION
    spec.timeout.FromSeconds(120)
    channel = secure_channel(f"{mesh.options.host}:{mesh.options.coordinator_port}", files)
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        view = EventView(err=console, out=sys.stdout, live=console.is_terminal)
        with view:
            call = stub.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec))
            return await follow(stub, call, view, interactive=False)
    finally:
        await channel.close()


def _endpoint_table(mesh: Mesh) -> Table:
    table = Table(title="hivewire mesh", show_lines=False)
    table.add_column("service")
    table.add_column("gRPC (mTLS)")
    table.add_column("metrics")
    table.add_column("identity")
    table.add_column("pid", justify="right")
    table.add_row("nats-server", mesh.nats.url, mesh.nats.monitor_url, "JetStream", "")
    for e in mesh.endpoints:
        table.add_row(e.name, e.address, e.metrics or "", e.identity, str(e.pid))
    return table


async def _wait_for_stop(mesh: Mesh, console: Console) -> str:
    """Wait for SIGINT/SIGTERM, or for the launcher to give up on a child; say which.

    Meanwhile the launcher restarts coordinators that die (and says so here).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = "stopped"

    def on_signal(name: str) -> None:
        nonlocal reason
        reason = f"{name} received"
        stop.set()

    def on_restart(dead: ManagedProcess, replacement: ManagedProcess) -> None:
        mesh.restarted(dead, replacement)
        console.print(
            f"{dead.spec.name} (pid {dead.pid}) exited with {dead.process.returncode};"
            f" restarted as pid {replacement.pid}",
            markup=False,
            highlight=False,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    supervisor = asyncio.ensure_future(mesh.launcher.supervise(on_restart=on_restart))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, supervisor], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (stopper, supervisor):
            fut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if stopper in done:
        return reason
    return supervisor.result()


async def _up(options: MeshOptions, *, demo: bool, console: Console) -> int:
    async with Launcher() as launcher:
        mesh = Mesh(options, launcher)
        console.print(
            f"model backend: [bold]{mesh.model_backend}[/bold] ({mesh.model_backend_reason})"
        )
        coordinators = (
            "coordinator" if options.coordinators == 1 else f"{options.coordinators} coordinators"
        )
        console.print(f"task store: [bold]{options.store}[/bold]")
        console.print(
            f"starting nats-server, {coordinators}, model, tool, agents and A2A gateway..."
        )
        try:
            await mesh.start()
        except (LaunchError, RuntimeError, OSError) as exc:
            console.print(f"[red]Error:[/red] could not start the mesh: {exc}", markup=True)
            return EXIT_START_FAILED
        console.print(_endpoint_table(mesh))
        console.print(f"endpoints for scripts: {options.state_dir / 'endpoints.json'}")
        console.print(
            f"A2A gateway: {mesh.a2a_url} (agent card: {mesh.a2a_card_url}; docs/interop.md)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        console.print(f"dashboard: {mesh.dashboard_url}", markup=False, highlight=False)
        if demo:
            console.print(f"\n[bold]demo task[/bold] ({DEMO_CAPABILITY}): {DEMO_QUESTION}")
            status = await _run_demo(mesh, console)
            console.print(f"demo task exit status: {status}")
        console.print("\nStream a task yourself:")
        console.print(
            mesh.grpcurl_command(capability="summarize", text="hivewire streams every step."),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        console.print("\nmesh is running; press Ctrl-C to stop it.")
        reason = await _wait_for_stop(mesh, console)
        console.print(f"{reason}; stopping every process...")
    console.print("all processes stopped.")
    return 0


_DEFAULTS = MeshOptions()
"""``hivewire up``'s defaults are the launcher's."""


@app.command()
def up(
    agent: Annotated[
        list[str] | None,
        typer.Option(
            "--agent",
            help=(
                "Agent to start, repeatable: an example name "
                f"({', '.join(EXAMPLE_AGENTS)}) or module:Class. Default: all examples."
            ),
        ),
    ] = None,
    demo: Annotated[bool, typer.Option(help="Run a demo task once the mesh is up.")] = True,
    coordinators: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_COORDINATORS,
            help="Coordinators to run (more than one needs --store jetstream).",
        ),
    ] = _DEFAULTS.coordinators,
    store: Annotated[
        Store,
        typer.Option(help="Task store: sqlite (one coordinator) or jetstream (the mesh's NATS)."),
    ] = _DEFAULTS.store,
    coordinator_port: Annotated[int, typer.Option(help="(First) coordinator gRPC port.")] = (
        _DEFAULTS.coordinator_port
    ),
    extra_coordinator_port: Annotated[
        int, typer.Option(help="Port of the second coordinator; the next ones follow it.")
    ] = _DEFAULTS.extra_coordinator_port,
    model_port: Annotated[int, typer.Option(help="Model service gRPC port.")] = (
        _DEFAULTS.model_port
    ),
    tool_port: Annotated[int, typer.Option(help="Tool service gRPC port.")] = _DEFAULTS.tool_port,
    first_agent_port: Annotated[int, typer.Option(help="Port of the first agent.")] = (
        _DEFAULTS.first_agent_port
    ),
    a2a_port: Annotated[int, typer.Option(help="A2A gateway gRPC port.")] = _DEFAULTS.a2a_port,
    a2a_http_port: Annotated[int, typer.Option(help="A2A gateway HTTPS port.")] = (
        _DEFAULTS.a2a_http_port
    ),
    nats_port: Annotated[int, typer.Option(help="NATS client port.")] = _DEFAULTS.nats_port,
    nats_monitor_port: Annotated[int, typer.Option(help="NATS monitoring port.")] = (
        _DEFAULTS.nats_monitor_port
    ),
    dashboard_port: Annotated[int, typer.Option(help="Web dashboard HTTPS port.")] = (
        _DEFAULTS.dashboard_port
    ),
    state_dir: Annotated[
        Path, typer.Option(help="Logs, NATS data, the task database, endpoints.json.")
    ] = _DEFAULTS.state_dir,
    certs_dir: Annotated[Path, typer.Option(help="Dev PKI directory.")] = _DEFAULTS.certs_dir,
    model_backend: Annotated[
        str | None,
        typer.Option(help="local, deterministic, ollama or openai. Default: local if installed."),
    ] = None,
) -> None:
    """Start the whole mesh (NATS, coordinator, model, tool, agents, A2A gateway) until Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True, soft_wrap=True)
    if not console.is_terminal:
        # Logs and pipes: wide enough that the endpoint table is never cut.
        console.width = 160
    options = MeshOptions(
        agents=tuple(agent or EXAMPLE_AGENTS),
        coordinators=coordinators,
        store=store,
        coordinator_port=coordinator_port,
        extra_coordinator_port=extra_coordinator_port,
        model_port=model_port,
        tool_port=tool_port,
        first_agent_port=first_agent_port,
        a2a_port=a2a_port,
        a2a_http_port=a2a_http_port,
        nats_port=nats_port,
        nats_monitor_port=nats_monitor_port,
        dashboard_port=dashboard_port,
        state_dir=state_dir,
        certs_dir=certs_dir,
        model_backend=model_backend,
    )
    try:
        options.check()
    except MeshOptionsError as exc:
        console.print(f"Error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        status = asyncio.run(_up(options, demo=demo, console=console))
        raise typer.Exit(status)
    raise typer.Exit(130)
