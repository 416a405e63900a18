"""Idle-connection floods: a legitimate restorer still gets in.

The flood is a helper process (tests/flood_client.py) that connects to the
handoff socket as another user, sends nothing and holds on; the restore is
a real target process, as root, checking every byte.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazypaged.client import Handoff

from .conftest import MiB, finish
from .test_bad_clients import LogMark, fd_count, running_daemon

HERE = Path(__file__).parent
FLOOD = HERE / "flood_client.py"
#: The flood's user: not root, not the restorer.
FLOOD_UID = 65534
SIZE = 4 * MiB


def test_connect_waits_for_room_in_a_full_backlog_until_its_timeout(tmp_path: Path) -> None:
    """A listener whose backlog is full: connect() used to fail at once with
    BlockingIOError whatever the timeout; it waits now, and says timeout."""
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv, contextlib.ExitStack() as stack:
        srv.bind(str(path))
        srv.listen(0)
        while True:  # fill the backlog: connects that the listener never accepts
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
            try:
                s.connect(str(path))
            except BlockingIOError:
                break
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            Handoff.connect(path, timeout=0.5)
        assert time.monotonic() - t0 >= 0.45
        # Room again: the same call connects.
        conn, _ = srv.accept()
        stack.enter_context(conn)
        Handoff.connect(path, timeout=5).close()


def test_restore_gets_through_a_1000_connection_idle_flood(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the flood runs as another user")
    metrics = '\n[metrics]\nenabled = true\naddress = "127.0.0.1:0"\n'
    with running_daemon(tmp_path, metrics) as d:
        d.image("img", SIZE)
        port = int(str(next(ln["port"] for ln in d.log_lines() if ln.get("listener") == "metrics" and "port" in ln)))
        mark = LogMark(d)
        base_fds = fd_count(d)
        flood = subprocess.Popen(
            [sys.executable, str(FLOOD), str(d.socket), "1000", str(FLOOD_UID)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert flood.stdout is not None
            report = json.loads(flood.stdout.readline())
            # Most of the flood was taken and turned away, not left in the backlog.
            assert report["connected"] >= 900, report
            held = fd_count(d) - base_fds
            # While the flood holds its connections, a restorer gets in and every byte is right.
            rc, lines, err = finish(d.target("img", SIZE, "--touch", "random"), timeout=120)
            assert rc == 0, (lines, err)
            assert lines[-1]["ok"] is True, lines
            # And a scrape is answered meanwhile.
            scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                scrape.request("GET", "/metrics")
                resp = scrape.getresponse()
                assert resp.status == 200
                assert b"lazypaged_" in resp.read()
            finally:
                scrape.close()
        finally:
            flood.communicate(timeout=60)  # closing its stdin ends the flood
        limited = mark.wait_for(lambda ln: ln.get("event") == "pending_limit")
        assert limited["uid"] == FLOOD_UID, limited
        # What the flood could hold in the daemon was bounded by the per-user limit.
        assert held <= 80, held
