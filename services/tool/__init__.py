"""The tool service: typed, policy-checked tool calls for agents over gRPC.

Tools come from three sources: the built-ins in :mod:`hivewire.services.tool.builtins`,
plugins registered through the ``hivewire.tools`` entry point group with the
:func:`hivewire.services.tool.sdk.tool` decorator, and the tools of Model Context
Protocol servers configured in the settings. See docs/tools.md.

This package's ``__init__`` stays import-light on purpose: plugins import
``hivewire.services.tool.sdk`` and every process's settings check loads
``hivewire.services.tool.settings`` (an entry point), neither of which should pull in
the service.
"""
