"""A process that registers itself in a hivewire registry and heartbeats until stopped.

Run as ``python -m tests.support.registrant --discovery URL --name NAME --port PORT``. Once
registered it writes ``$HIVEWIRE_PORTS_FILE`` (the ``ServiceProcess`` readiness protocol)
with its instance id; SIGTERM closes the registry (deregistering), SIGKILL leaves the
entry to expire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from hivewire.discovery import META_INSTANCE_NAME, Instance, new_instance_id, open_registry


def _write_ports(instance: Instance) -> None:
    target = os.environ.get("HIVEWIRE_PORTS_FILE")
    if not target:
        return
    data = {
        "grpc": instance.port,
        "metrics": None,
        "address": instance.endpoint,
        "pid": os.getpid(),
        "instance_id": instance.instance_id,
    }
    tmp = Path(f"{target}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(target)


async def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--discovery", required=True)
    parser.add_argument("--nats-url", default="")
    parser.add_argument("--token", default=None)
    parser.add_argument("--service", default="hivewire-agent")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("--options", default="{}", help="registry options as JSON")
    parser.add_argument(
        "--no-instance-name",
        action="store_true",
        help="register without an explicit meta instance_name (as agents do)",
    )
    args = parser.parse_args(argv)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    registry = open_registry(
        args.discovery, nats_url=args.nats_url, consul_token=args.token, **json.loads(args.options)
    )
    async with registry:
        instance = Instance(
            service=args.service,
            instance_id=new_instance_id(args.name),
            address="127.0.0.1",
            port=args.port,
            tags=tuple(args.tag),
            meta={} if args.no_instance_name else {META_INSTANCE_NAME: args.name},
        )
        await registry.register(instance)
        _write_ports(instance)
        await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_main(sys.argv[1:]))
