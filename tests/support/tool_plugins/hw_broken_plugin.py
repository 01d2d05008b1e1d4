"""A plugin that fails to import: the service must log it and carry on."""

raise ImportError("hw_broken_plugin is broken on purpose")
