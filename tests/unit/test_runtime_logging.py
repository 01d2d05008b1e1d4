"""Logging: ids on every record (libraries included), text and JSON formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from hivewire.services.runtime.logging import (
    bind_correlation_id,
    bind_task,
    correlation_id_var,
    new_correlation_id,
    setup_logging,
    task_id_var,
)


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_text_lines_carry_both_ids_when_set(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    log = logging.getLogger("hivewire.test.text")
    log.info("plain")
    with bind_correlation_id("c0ffee"), bind_task("task-9"):
        log.info("inside %s", "task")
    # A third-party library's logger gets the same stamp.
    with bind_correlation_id("c0ffee"):
        logging.getLogger("somelib.module").warning("library line")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("hivewire.test.text: plain")
    assert "[cid=c0ffee task=task-9]" in lines[1] and lines[1].endswith("inside task")
    assert "[cid=c0ffee]" in lines[2] and "library line" in lines[2]
    assert correlation_id_var.get() is None and task_id_var.get() is None


def test_json_lines(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out)
    log = logging.getLogger("hivewire.test.json")
    with bind_correlation_id("abc"), bind_task("t1"):
        log.debug("hello %d", 42, extra={"agent": "planner"})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "hello 42"
    assert first["level"] == "DEBUG" and first["logger"] == "hivewire.test.json"
    assert first["correlation_id"] == "abc" and first["task_id"] == "t1"
    assert first["agent"] == "planner"
    assert "correlation_id" not in second
    assert "ValueError: bad" in second["exc_info"]


def test_setup_twice_keeps_one_handler(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    setup_logging("INFO", "text", stream=out)
    logging.getLogger("hivewire.test.once").info("just once")
    assert out.getvalue().count("just once") == 1
    with pytest.raises(ValueError):
        setup_logging("INFO", "yaml")


def test_new_correlation_ids_are_unique_hex() -> None:
    ids = {new_correlation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
