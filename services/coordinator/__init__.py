"""The coordinator: durable task lifecycle, scheduling and live, resumable task streams.

Modules: :mod:`.store` (SQLite), :mod:`.queue` (priority queue with aging),
:mod:`.dispatch` (agent pool and selection), :mod:`.service` (the domain),
:mod:`.servicer` (the gRPC adapter), :mod:`.convert`, :mod:`.settings`.
Kept import-light on purpose: ``runtime.config`` imports :mod:`.settings`.
"""
