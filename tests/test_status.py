"""``lazypaged status`` against a real daemon serving a real restore."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged import control_protocol as cp
from lazypaged.control import ControlClient, ControlError

from .conftest import MiB
from .ops_helpers import OpsDaemon, running_ops_daemon

PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 16 * MiB
TOUCHED = 40


@pytest.fixture
def ops_daemon(tmp_path: Path) -> Iterator[OpsDaemon]:
    yield from running_ops_daemon(tmp_path)


def _session(doc: dict[str, object], sid: object) -> dict[str, object]:
    sessions = doc["sessions"]
    assert isinstance(sessions, list)
    found = [s for s in sessions if s["id"] == sid]
    assert found, f"session {sid} not in {sessions}"
    s: dict[str, object] = found[0]
    return s


def test_status_json_shows_the_session_and_its_progress(ops_daemon: OpsDaemon) -> None:
    ops_daemon.d.image("img", SIZE)
    t = ops_daemon.target("img", SIZE, TOUCHED)
    try:
        accepted = t.line()
        assert t.line() == {"touched": TOUCHED, "ok": True}
        doc = ops_daemon.status()
        s = _session(doc, accepted["accepted"])
        assert s["kind"] == "native"
        assert s["pid"] == accepted["pid"]
        assert s["state"] == "running"
        assert s["sources"] == ["img"]
        assert s["pages_total"] == SIZE // PAGE
        # One fault per page, no fault-around, no fill: the daemon installed
        # exactly the pages this target touched.
        assert s["faults"] == TOUCHED
        assert s["pages_installed"] == TOUCHED
        assert s["bytes_copied"] + s["bytes_zero"] == TOUCHED * PAGE  # type: ignore[operator]
        assert s["bytes_fault"] == TOUCHED * PAGE
        assert s["bytes_fill"] == 0
        assert s["fault_p50_us"] is not None
        assert s["fault_p50_us"] <= s["fault_p99_us"]  # type: ignore[operator]
        assert doc["daemon"]["state"] == "running"  # type: ignore[index]
        assert doc["daemon"]["pid"] == ops_daemon.d.proc.pid  # type: ignore[index]
        assert doc["sources"] == [{"name": "img", "type": "raw image", "size": SIZE, "sessions": 1,
                                   "bytes_in_flight": None, "reconnects": None}]
    finally:
        assert t.release() == 0
    # Once the target is gone its session leaves the table.
    deadline = time.monotonic() + 10
    while _sessions_now(ops_daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    doc = ops_daemon.status()
    assert doc["sessions"] == []
    assert doc["daemon"]["sessions_finished"] == 1  # type: ignore[index]


def _sessions_now(od: OpsDaemon) -> list[object]:
    with ControlClient(od.control) as c:
        return list(c.status().sessions)


def test_human_table_names_session_and_columns(ops_daemon: OpsDaemon) -> None:
    ops_daemon.d.image("img", SIZE)
    t = ops_daemon.target("img", SIZE, 5)
    try:
        sid = t.line()["accepted"]
        t.line()
        out = subprocess.run([sys.executable, "-m", "lazypaged", "status", "--socket", str(ops_daemon.control)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        for word in ("SESSION", "KIND", "PID", "PAGES", "FAULTS", "P50", "P99", "FILL", "STATE", "native",
                     str(sid), f"5/{SIZE // PAGE}", "running", "raw image"):
            assert word in out.stdout, (word, out.stdout)
    finally:
        t.release()


def test_watch_json_prints_a_line_per_refresh(ops_daemon: OpsDaemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazypaged", "status", "--json", "--watch", "0.05", "--socket",
         str(ops_daemon.control)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert all(x["type"] == "status_reply" and x["sessions"] == [] for x in lines)
    assert lines[0]["daemon"]["uptime_s"] < lines[2]["daemon"]["uptime_s"]


def test_control_socket_mode_and_many_requests_on_one_connection(ops_daemon: OpsDaemon) -> None:
    assert stat.S_IMODE(ops_daemon.control.stat().st_mode) == 0o660
    with ControlClient(ops_daemon.control) as c:
        replies = [c.status() for _ in range(20)]
    assert len({r.daemon.pid for r in replies}) == 1


def test_garbage_gets_an_error_and_the_daemon_keeps_answering(ops_daemon: OpsDaemon) -> None:
    for garbage in (b"hello\n", b'{"v": 2, "type": "status"}\n', b'{"v":1,"type":"status_reply"}\n',
                    b"x" * (cp.MAX_REQUEST_LINE + 10)):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(ops_daemon.control))
            s.sendall(garbage)
            reply = cp.LineDecoder(cp.MAX_REPLY_LINE).feed(s.recv(65536))
        assert len(reply) == 1, (garbage[:40], reply)
        assert isinstance(reply[0], cp.ErrorReply), (garbage[:40], reply)
    with ControlClient(ops_daemon.control) as c:
        assert c.status().daemon.state == "running"


def test_no_daemon_is_a_clear_failure() -> None:
    out = subprocess.run([sys.executable, "-m", "lazypaged", "status", "--socket", "/nonexistent/control.sock"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "cannot connect" in out.stderr
    assert "daemon running" in out.stderr
    with pytest.raises(ControlError, match="cannot connect"):
        ControlClient("/nonexistent/control.sock")


def test_watch_on_a_terminal_redraws_until_interrupted(ops_daemon: OpsDaemon) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazypaged", "status", "--watch", "0.1", "--socket", str(ops_daemon.control)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
    )
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"no sessions") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                seen += os.read(master, 65536)
        assert seen.count(b"no sessions") >= 2, seen  # drawn, then drawn again
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(master)


def test_control_settings() -> None:
    from lazypaged.config import Config, from_dict
    from lazypaged.operations import control_socket_path

    assert control_socket_path(Config()) == Path("/run/lazypaged/control.sock")
    cfg = from_dict({"daemon": {"handoff_socket": "/srv/x/h.sock"}, "control": {"socket_mode": "0600"}})
    assert control_socket_path(cfg) == Path("/srv/x/control.sock")
    assert cfg.control.socket_mode == 0o600
    assert control_socket_path(from_dict({"control": {"socket": "/run/c.sock"}})) == Path("/run/c.sock")


def test_idle_connections_do_not_lock_status_out(ops_daemon: OpsDaemon) -> None:
    """Three times as many silent connections as the control socket keeps:
    ``lazypaged status`` is still answered (it used to get ``busy`` until
    the idle ones timed out after 5 minutes), and a silent connection is
    dropped with a log line."""
    from lazypaged.control import MAX_CLIENTS

    idle = []
    try:
        for _ in range(MAX_CLIENTS * 3):
            s = socket.socket(socket.AF_UNIX)
            idle.append(s)
            s.settimeout(30)
            s.connect(str(ops_daemon.control))
        with ControlClient(ops_daemon.control, timeout=10) as c:
            assert c.status().daemon.state == "running"
        # A watcher that keeps asking is not the one made room for.
        with ControlClient(ops_daemon.control, timeout=10) as watcher:
            watcher.status()
            for _ in range(MAX_CLIENTS * 2):
                s = socket.socket(socket.AF_UNIX)
                idle.append(s)
                s.settimeout(30)
                s.connect(str(ops_daemon.control))
            assert watcher.status().daemon.state == "running"
        for s in idle:
            with contextlib.suppress(ConnectionResetError):
                while s.recv(65536):
                    pass
    finally:
        for s in idle:
            s.close()
    dropped = [ln for ln in ops_daemon.d.log_lines() if ln.get("event") == "control_client_dropped"]
    assert dropped, "no control_client_dropped line"
