"""The daemon's log lines during a real restore: JSON, and every session line
says which session, of which kind, for which process."""

from __future__ import annotations

import io
import json
import os
import pty
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from lazypaged import log as logsetup

from .conftest import MiB
from .ops_helpers import OpsDaemon, running_ops_daemon

SIZE = 8 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE")
SUMMARY_FIELDS = ("outcome", "seconds", "pages_total", "pages_installed", "faults", "fault_p50_us", "fault_p99_us",
                  "bytes_copied", "bytes_zero", "bytes_fault", "bytes_fill")


@pytest.fixture
def ops_daemon(tmp_path: Path) -> Iterator[OpsDaemon]:
    yield from running_ops_daemon(tmp_path)


def test_session_lines_are_json_and_carry_session_kind_pid(ops_daemon: OpsDaemon) -> None:
    ops_daemon.d.image("img", SIZE)
    t = ops_daemon.target("img", SIZE, 12, fill=True)
    try:
        accepted = t.line()
        t.line()
        t.line()
    finally:
        assert t.release() == 0
    sid, pid = accepted["accepted"], accepted["pid"]
    lines = ops_daemon.d.log.read_text().splitlines()
    parsed = [json.loads(x) for x in lines]  # every line is one JSON object
    assert all(isinstance(x, dict) and "event" in x and "timestamp" in x and "level" in x for x in parsed)
    mine = [x for x in parsed if sid in json.dumps(x)]
    assert {x["event"] for x in mine} >= {"session_started", "session_ended"}
    for x in mine:
        assert x.get("session") == sid, x
        assert x.get("kind") == "native", x
        assert x.get("pid") == pid, x
    # Lines about a session always name it: none carries a session key without kind and pid.
    for x in parsed:
        if "session" in x:
            assert "kind" in x, x
            assert "pid" in x or "parent" in x, x
    (ended,) = [x for x in mine if x["event"] == "session_ended"]
    for field in SUMMARY_FIELDS:
        assert field in ended, (field, ended)
    assert ended["outcome"] == "complete"
    assert ended["pages_installed"] == ended["pages_total"] == SIZE // PAGE
    assert ended["bytes_copied"] + ended["bytes_zero"] == SIZE
    assert ended["bytes_fault"] + ended["bytes_fill"] == SIZE


def _render(fmt: str, stream: io.TextIOBase | io.TextIOWrapper) -> None:
    try:
        logsetup.setup(fmt, "info", stream=stream)
        structlog.get_logger().bind(session="abc123", kind="native", pid=42).info("session_started", ranges=1)
        stream.flush()
    finally:
        structlog.reset_defaults()


def test_json_on_a_pipe_console_on_a_terminal() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        _render("auto", pipe)
    with os.fdopen(r) as f:
        line = json.loads(f.read())
    assert line["event"] == "session_started"
    assert line["session"] == "abc123"

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            _render("auto", tty)
            text = os.read(master, 65536).decode()
    finally:
        os.close(master)
    assert "session_started" in text
    assert "abc123" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
