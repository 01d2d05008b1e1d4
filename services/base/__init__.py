"""The lowest hand-written layer: plumbing every other package may use.

Retry pacing (:mod:`.backoff`), start/stop helpers (:mod:`.lifecycle`) and the run-time
check of keyword options gathered in a ``TypedDict`` (:mod:`.keywords`). It imports
nothing of hivewire, so discovery and the runtime above it can both use it
(docs/architecture.md).
"""
