"""Service discovery: the Registry protocol and its Consul and embedded (NATS KV) backends."""
