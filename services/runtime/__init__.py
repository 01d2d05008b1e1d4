"""Shared service runtime: settings, logging, TLS, servers, channels, errors, metrics, events."""
