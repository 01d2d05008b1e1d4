"""The operators' live web dashboard (``hivewire dashboard``): see docs/observability.md."""
