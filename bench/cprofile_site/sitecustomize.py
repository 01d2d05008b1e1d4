"""cProfile inside one service of the benchmark mesh, for ``bench/cprofile.py``.

On ``PYTHONPATH`` of the mesh's services with ``BENCH_CPROFILE_OUT`` set, the service
whose ports file is named ``BENCH_CPROFILE_WHO`` (``agent-0`` by default) gets a
profiler on its main thread (the event loop's), timed with the thread's CPU clock:
``SIGUSR2`` starts a new one, ``SIGUSR1`` stops it and writes the stats to
``BENCH_CPROFILE_OUT`` (``pstats`` format). Never in a service's own code.
"""

from __future__ import annotations

import cProfile
import os
import signal
import time

_OUT = os.environ.get("BENCH_CPROFILE_OUT")
_WHO = os.environ.get("BENCH_CPROFILE_WHO", "agent-0")
_STEM = os.path.splitext(os.path.basename(os.environ.get("HIVEWIRE_PORTS_FILE", "")))[0]

if _OUT and _STEM == _WHO:
    _profile = cProfile.Profile(time.thread_time_ns, 1e-9)

    def _start(*_: object) -> None:
        global _profile
        _profile = cProfile.Profile(time.thread_time_ns, 1e-9)  # each phase on its own
        _profile.enable()

    def _dump(*_: object) -> None:
        _profile.disable()
        assert _OUT is not None
        _profile.dump_stats(_OUT + ".tmp")
        os.replace(_OUT + ".tmp", _OUT)

    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _dump)
