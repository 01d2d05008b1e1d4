"""Hand-written hivewire services: shared runtime, coordinator, agents, model and tool services, CLI."""
