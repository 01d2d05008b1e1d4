"""Hand-written hivewire code: shared runtime, coordinator, agents, model and tool services, CLI."""
