"""The installed hivewire version, for cards, server info and status replies."""

from __future__ import annotations

from importlib import metadata


def hivewire_version() -> str:
    """The version of the installed ``hivewire`` distribution ("" when not installed)."""
    try:
        return metadata.version("hivewire")
    except metadata.PackageNotFoundError:
        return ""
