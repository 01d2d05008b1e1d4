"""Test support code: in-process stand-ins and helper processes for integration tests."""
