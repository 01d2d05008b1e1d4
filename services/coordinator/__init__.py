"""The coordinator: durable task lifecycle, scheduling and live, resumable task streams.

Modules: :mod:`.service` (the domain), :mod:`.servicer` (the gRPC adapter),
:mod:`.store` (SQLite), :mod:`.queue` (priority queue with aging), :mod:`.dispatch`
(agent pool, selection, the Execute call), :mod:`.model` (domain values),
:mod:`.convert`, :mod:`.settings`, :mod:`.metrics`, :mod:`.app` (process wiring).
"""
