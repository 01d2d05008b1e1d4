"""``Launcher.stop_all`` stops its children tier by tier, the children of a tier at once.

Real child processes (this interpreter running a few lines of Python) write to one
shared journal when they get SIGTERM and when they exit. A child may wait, on SIGTERM,
until named others got theirs too: stopped one after another, the first of them would
wait for a signal that never comes and be killed at the end of the grace period (a
negative exit status), so exit 0 everywhere shows the tier was signalled at once. One
child ignores SIGTERM: it is killed, the others are not held past its grace period.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import pytest

from hivewire.services.mesh.launcher import Launcher, ProcessSpec, StopTier

pytestmark = pytest.mark.timeout(90)

# argv: ports file, journal, own name, then the names whose SIGTERM it waits for before
# it exits. Polls the journal in the child: the test itself waits on the launcher.
CHILD = """
import json, os, signal, sys, time
ports, journal, name, *others = sys.argv[1:]

def note(line):
    with open(journal, "a") as f:
        f.write(line + "\\n")

def on_term(*_):
    note(f"term {name}")
    while not all(f"term {o}" in open(journal).read().splitlines() for o in others):
        time.sleep(0.01)
    note(f"exit {name}")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
with open(ports + ".tmp", "w") as f:
    json.dump({"pid": os.getpid()}, f)
os.replace(ports + ".tmp", ports)
while True:
    time.sleep(3600)
"""
STUBBORN = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"pid": os.getpid()}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(3600)
"""


def _spec(tmp: Path, name: str, tier: StopTier, *others: str, code: str = CHILD) -> ProcessSpec:
    ports = tmp / f"{name}.json"
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-c", code, str(ports), str(tmp / "journal"), name, *others],
        log_file=tmp / f"{name}.log",
        ports_file=ports,
        ready_timeout=30,
        stop_tier=tier,
    )


async def test_tiers_stop_in_order_each_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivewire.services.mesh.launcher")
    # Started in the order `hivewire up` uses: the server first, the clients last.
    layout = [
        ("nats-server", StopTier.SERVER, ()),
        ("coordinator", StopTier.CORE, ("model", "tool")),
        ("model", StopTier.CORE, ("coordinator", "tool")),
        ("tool", StopTier.CORE, ("coordinator", "model")),
        ("agent-a", StopTier.CLIENT, ("agent-b", "a2a")),
        ("agent-b", StopTier.CLIENT, ("agent-a", "a2a")),
        ("a2a", StopTier.CLIENT, ("agent-a", "agent-b")),
    ]
    async with Launcher(grace_period=60) as launcher:
        children = [
            await launcher.start(_spec(tmp_path, name, tier, *others))
            for name, tier, others in layout
        ]
    assert not launcher.children
    # Every child ended on its own (none was killed at the end of the grace period).
    assert {c.spec.name: c.process.returncode for c in children} == {
        name: 0 for name, _, _ in layout
    }
    journal = (tmp_path / "journal").read_text().splitlines()
    assert sorted(journal) == sorted(
        [f"term {name}" for name, _, _ in layout] + [f"exit {name}" for name, _, _ in layout]
    ), journal

    def span(names: set[str]) -> tuple[int, int]:
        """Where the first SIGTERM and the last exit of these children are in the journal."""
        at = [i for i, line in enumerate(journal) if line.split()[1] in names]
        return at[0], at[-1]

    clients = span({"agent-a", "agent-b", "a2a"})
    core = span({"coordinator", "model", "tool"})
    server = span({"nats-server"})
    assert clients[1] < core[0] and core[1] < server[0], journal
    stopped = [r.getMessage() for r in caplog.records if " stopped: " in r.getMessage()]
    for child in children:
        assert f"{child.spec.name} (pid {child.pid}) stopped: exit 0" in stopped, stopped


async def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivewire.services.mesh.launcher")
    async with Launcher(grace_period=2) as launcher:
        server = await launcher.start(_spec(tmp_path, "server", StopTier.SERVER))
        stubborn = await launcher.start(_spec(tmp_path, "stubborn", StopTier.CLIENT, code=STUBBORN))
        polite = await launcher.start(_spec(tmp_path, "polite", StopTier.CLIENT))
    assert not launcher.children
    assert stubborn.process.returncode == -signal.SIGKILL
    assert polite.process.returncode == 0 and server.process.returncode == 0
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"stubborn (pid {stubborn.pid}) did not stop within its grace period (2s); killing it"
        in messages
    ), messages
    assert f"stubborn (pid {stubborn.pid}) stopped: killed by SIGKILL" in messages, messages
    # The server tier waited for the killed straggler: it got its SIGTERM last.
    journal = (tmp_path / "journal").read_text().splitlines()
    assert journal == ["term polite", "exit polite", "term server", "exit server"], journal
