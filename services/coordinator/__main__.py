"""``python -m hivewire.services.coordinator``: run the coordinator.

Startup: settings, logging, events, the SQLite store (recovering unfinished tasks),
discovery, the gRPC server (SERVING), registration as ``hivewire-coordinator``; then
what start-up made, recovered tasks included, is frozen out of the garbage collector's
view (``gc.freeze``: full collections no longer walk it; docs/performance.md), and so,
from then on, is what survives a full collection that took longer than
``GC_PAUSE_BUDGET`` (``runtime/gcfreeze.py``: tasks submitted since, a backlog); every
``GC_THAW_AFTER`` seconds the next full collection unfreezes it all first (the start-up
heap too), so that no frozen reference cycle is held longer.
SIGTERM reverses it: NOT_SERVING, deregister, open task streams end with
UNAVAILABLE (clients resume with WatchTask), in-flight calls get the grace period,
running attempts are cancelled and stay recorded as running, so the next start
dispatches them again. Defaults when the environment sets nothing: identity
``coordinator``, port 50051, metrics on port 51051, database
``.hivewire/coordinator.db``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hivewire.services.coordinator.app import freeze_start_up_heap, start_coordinator
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime.bootstrap import COORDINATOR_PORT, ServiceEntry, service_process
from hivewire.services.runtime.gcfreeze import CollectorFreezer
from hivewire.services.runtime.server import serve_until_signal

logger = logging.getLogger(__name__)

ENTRY = ServiceEntry(
    "coordinator",
    title="hivewire coordinator",
    port=COORDINATOR_PORT,
    settings_model=CoordinatorProcessSettings,
)


def service_settings(settings: CoordinatorProcessSettings) -> CoordinatorProcessSettings:
    """Fill in the coordinator's defaults for what the environment left unset."""
    return ENTRY.defaults(settings)


async def serve(settings: CoordinatorProcessSettings) -> None:
    """Run the coordinator until SIGTERM or SIGINT."""
    async with service_process(settings, "coordinator") as process:
        running = await start_coordinator(process, settings)
        frozen = freeze_start_up_heap()
        logger.debug("%d start-up objects frozen out of the garbage collector's view", frozen)
        section = settings.coordinator
        freezer = CollectorFreezer(section.gc_pause_budget, thaw_after=section.gc_thaw_after)
        freezer.install(frozen=True)
        try:
            await serve_until_signal(running.server)
        finally:
            freezer.uninstall()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    parser = ENTRY.parser()
    parser.add_argument("--db", type=Path, help="SQLite database (HIVEWIRE_COORDINATOR__DB_PATH)")
    args = parser.parse_args(argv)
    sections = {"coordinator": {"db_path": args.db}} if args.db is not None else {}
    ENTRY.run(serve, ENTRY.settings(args, **sections))


if __name__ == "__main__":
    main()
