"""A faithful in-process stand-in for the Consul agent HTTP API (see server.py)."""

from .server import AclToken, ConsulStandin, HttpError, Timing

__all__ = ["AclToken", "ConsulStandin", "HttpError", "Timing"]
