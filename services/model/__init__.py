"""The model service: one gRPC front for every LLM backend (see docs/model.md).

Run it with ``python -m hivewire.services.model``; agents talk to it through
:class:`hivewire.services.model.client.ModelClient`. This package's ``__init__`` stays
import-light because every process's settings check loads :mod:`.settings` from it
(an entry point).
"""
