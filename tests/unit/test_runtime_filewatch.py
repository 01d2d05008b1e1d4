"""The runtime's one mtime watcher (services/runtime/filewatch.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hivewire.services.runtime.filewatch import FileWatch


def _touch(path: Path, ns: int) -> None:
    path.write_text("x")
    os.utime(path, ns=(ns, ns))


def test_a_change_counts_until_marked(tmp_path: Path) -> None:
    path = tmp_path / "a"
    _touch(path, 1_000_000_000)
    watch = FileWatch(path)
    assert watch.mark() == (1_000_000_000,)
    assert watch.changed() is None
    _touch(path, 2_000_000_000)
    stamp = watch.changed()
    assert stamp == (2_000_000_000,)
    # Not taken in yet (the owner failed to read it, say): still new.
    assert watch.changed() == stamp
    watch.mark(stamp)
    assert watch.changed() is None


def test_several_files_one_stamp(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _touch(a, 1_000_000_000)
    _touch(b, 1_000_000_000)
    watch = FileWatch(a, b)
    watch.mark()
    _touch(b, 3_000_000_000)
    assert watch.changed() == (1_000_000_000, 3_000_000_000)


def test_before_marking_files_count_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "list"
    watch = FileWatch(path, missing_ok=True)
    assert watch.changed() is None  # missing, as it was assumed to be
    _touch(path, 5_000_000_000)
    assert watch.changed() == (5_000_000_000,)
    watch.mark((5_000_000_000,))
    path.unlink()
    assert watch.changed() == (None,)


def test_a_missing_file_is_an_error_unless_allowed(tmp_path: Path) -> None:
    watch = FileWatch(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        watch.changed()
    with pytest.raises(FileNotFoundError):
        watch.mark()


def test_checks_wait_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "policy"
    _touch(path, 1_000_000_000)
    watch = FileWatch(path, check_interval=3600.0)
    watch.mark()  # counts as a check: the next one is an hour away
    _touch(path, 2_000_000_000)
    assert watch.changed() is None


def test_forget_reports_the_files_again(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    _touch(path, 1_000_000_000)
    watch = FileWatch(path)
    watch.mark()
    watch.forget()
    assert watch.changed() == (1_000_000_000,)
