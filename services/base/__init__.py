"""The lowest hand-written layer: plumbing every other package may use.

Retry pacing (:mod:`.backoff`) and start/stop helpers (:mod:`.lifecycle`). It imports
nothing of hivewire, so discovery and the runtime above it can both use it
(docs/architecture.md).
"""
