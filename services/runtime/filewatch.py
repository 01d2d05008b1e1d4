"""Noticing that files changed on disk: the one mtime watcher of the runtime.

Everything the runtime re-reads when an operator edits it (the TLS certificate files,
the revocation list, the authz and tool policy files, the API key file, a JWKS file)
asks a :class:`FileWatch` whether its files changed since it last read them. A check
is a ``stat`` per file, done at most once per interval; what to do about a change
(re-read, validate, keep the old state when the new one is broken) stays with the
owner, which tells the watch when it has taken a change in (:meth:`FileWatch.mark`).
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["FileWatch", "Stamp"]

Stamp = tuple[int | None, ...]
"""The files' modification times (ns), in order; None for a missing file."""


class FileWatch:
    """Tells whether some files changed since they were last marked as taken in.

    Before anything is marked, the files count as missing: the first check after
    creation reports every file that exists.

    Args:
        paths: The files.
        check_interval: Minimum seconds between two checks; 0 checks every time.
        missing_ok: A missing file is a state of its own (None in the stamp) rather
            than an error.
    """

    def __init__(self, *paths: Path, check_interval: float = 0.0, missing_ok: bool = False) -> None:
        self.paths = paths
        self._interval = check_interval
        self._missing_ok = missing_ok
        self._checked = float("-inf")
        self._seen: Stamp | None = (None,) * len(paths)

    def stamp(self) -> Stamp:
        """The files' modification times now.

        Raises:
            OSError: A file cannot be read (a missing one too, unless ``missing_ok``).
        """
        return tuple(self._mtime(path) for path in self.paths)

    def _mtime(self, path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._missing_ok:
                return None
            raise

    def changed(self) -> Stamp | None:
        """The files' new stamp when it is time to check and they changed, else None.

        The change still counts as new until :meth:`mark` takes it in.

        Raises:
            OSError: As :meth:`stamp` (the check counts: the next one waits the interval).
        """
        now = time.monotonic()
        if now - self._checked < self._interval:
            return None
        self._checked = now
        stamp = self.stamp()
        return None if stamp == self._seen else stamp

    def mark(self, stamp: Stamp | None = None) -> Stamp:
        """Take a stamp in as seen (default: the files' stamp now, which counts as a check).

        Returns:
            The stamp taken in.

        Raises:
            OSError: As :meth:`stamp`, when no stamp is given.
        """
        if stamp is None:
            stamp = self.stamp()
            self._checked = time.monotonic()
        self._seen = stamp
        return stamp

    def forget(self) -> None:
        """Forget what was taken in: the next check reports the files as changed."""
        self._seen = None
