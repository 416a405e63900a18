"""The daemon's log lines during a real restore: JSON, and every session line
says which session, of which kind, for which process."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from lazypaged import __version__
from lazypaged import log as logsetup

from .conftest import DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon
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
    mine = [x for x in parsed if str(sid) in json.dumps(x)]
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


def _journal_stream_of(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_priority_prefix_only_on_the_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """journald reads ``<N>`` as the line's priority; anywhere else the
    prefix would break every JSON reader, so a JOURNAL_STREAM inherited
    while stderr points elsewhere must not add it."""
    r, w = os.pipe()
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(w))
    with os.fdopen(w, "w") as pipe:
        _render("auto", pipe)
    with os.fdopen(r) as f:
        text = f.read()
    assert text.startswith("<6>{"), text
    assert json.loads(text[3:])["event"] == "session_started"

    r, w = os.pipe()
    with open(os.devnull) as other:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(other.fileno()))
    with os.fdopen(w, "w") as pipe:
        _render("auto", pipe)
    with os.fdopen(r) as f:
        assert json.loads(f.read())["event"] == "session_started"


def _wait_line(path: Path, needle: str, proc: subprocess.Popen[bytes]) -> str:
    """The first line of ``path`` holding ``needle``; fails if the daemon exits first."""
    deadline = time.monotonic() + 30
    while True:
        exited = proc.poll() is not None
        for line in path.read_text().splitlines():
            if needle in line:
                return line
        assert not exited, f"daemon exited ({proc.returncode}) without {needle}: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {needle} in {path.read_text()[-2000:]}"
        time.sleep(0.02)  # polling the log file for the line, not a wait for time to pass


def test_daemon_on_the_journal_stream_prefixes_each_line_with_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's stderr stands where systemd's journal stream would: each
    line carries the syslog priority of its level, so `journalctl -p warning`
    shows warnings (every line was PRIORITY=6 before)."""
    _needs_root()
    log = tmp_path / "daemon.log"
    log.touch()  # start_daemon truncates it in place: the inode stays
    with open(log) as f:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(f.fileno()))
    d = start_daemon(tmp_path)
    try:
        d.proc.send_signal(signal.SIGUSR1)  # a signal_ignored warning
        _wait_line(d.log, '"signal_ignored"', d.proc)
    finally:
        assert stop_daemon(d) == 0
    want = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
    seen = set()
    for line in d.log.read_text().splitlines():
        m = re.fullmatch(r"<(\d)>(\{.*\})", line)
        assert m, line
        rec = json.loads(m.group(2))
        assert int(m.group(1)) == want[rec["level"]], line
        seen.add(rec["level"])
    assert {"info", "warning"} <= seen


def test_started_line_names_version_config_and_listeners(daemon: DaemonHandle) -> None:
    """One line at start says what runs, from which configuration, where it listens."""
    (started,) = [x for x in daemon.log_lines() if x.get("event") == "started"]
    assert started["version"] == __version__
    assert started["config"] == str(daemon.config)
    assert started["level"] == "info"
    listeners = started["listeners"]
    assert isinstance(listeners, list)
    assert f"handoff {daemon.socket}" in listeners
    assert f"control {daemon.socket.parent / 'control.sock'}" in listeners
