"""The Python client's wait for ``accepted`` against a daemon slow to answer.

A daemon may hold its answer up to ``[remote] reconnect_deadline`` (60 s by
default) while it rides out a peer:// link that is down at handoff; a client
that gave up after its 30 s connect timeout abandoned restores the daemon
would have served. A real Unix socket server stands in for that daemon: it
reads the request (uffd attached) and answers late, or not at all.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged import handoff_protocol as hp
from lazypaged.client import ACCEPT_TIMEOUT, Handoff, map_anonymous
from lazypaged.config import RemoteConfig
from lazypaged.uffd import Userfaultfd

from .conftest import _needs_root


class SlowDaemon:
    """Answers ``accepted`` ``delay`` seconds after the request arrived, or
    (delay None) once :meth:`release` is called."""

    def __init__(self, path: Path, delay: float | None) -> None:
        self.path = path
        self.delay = delay
        self.released = threading.Event()
        self.got_request = threading.Event()
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                decoder = hp.FrameDecoder()
                msgs: list[hp.Message] = []
                while not msgs:
                    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
                    for fd in fds:
                        socket.close(fd)
                    assert data, "the client closed before sending its request"
                    msgs = decoder.feed(data)
                assert isinstance(msgs[0], hp.RestoreRequest)
                self.got_request.set()
                # The stand-in for a daemon waiting on its peer: late on purpose.
                self.released.wait(self.delay)
                conn.sendall(hp.encode(hp.Accepted("slow1")))
                conn.recv(1)  # until the client closes
        except BaseException as e:
            self.error = e

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.thread.join(timeout=30)
        self.listener.close()


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    _needs_root()
    u = Userfaultfd.create()
    u.api(0)
    try:
        yield u
    finally:
        u.close()


def _ranges() -> list[tuple[int, int, str, int]]:
    _mem, addr = map_anonymous(4096)
    return [(addr, 4096, "img", 0)]


def test_default_accept_wait_outlives_the_connect_timeout(tmp_path: Path, uffd: Userfaultfd) -> None:
    """Before, the answer had to come within ``timeout`` (here 0.2 s)."""
    daemon = SlowDaemon(tmp_path / "h.sock", delay=1.0)
    try:
        h = Handoff.connect(daemon.path, timeout=0.2)
        try:
            t0 = time.monotonic()
            assert h.send(uffd, _ranges()) == "slow1"
            assert time.monotonic() - t0 >= 0.2
            assert h.sock.gettimeout() == 0.2, "sending keeps the connect timeout"
        finally:
            h.close()
    finally:
        daemon.close()
    assert daemon.error is None, daemon.error


def test_accept_timeout_bounds_the_wait(tmp_path: Path, uffd: Userfaultfd) -> None:
    daemon = SlowDaemon(tmp_path / "h.sock", delay=None)
    try:
        h = Handoff.connect(daemon.path, timeout=5.0, accept_timeout=0.3)
        try:
            with pytest.raises(TimeoutError, match=r"no answer to the restore request within 0\.3 s"):
                h.send(uffd, _ranges(), keep_uffd=True)
            assert daemon.got_request.is_set()
        finally:
            h.close()
    finally:
        daemon.close()


def test_accept_timeout_defaults() -> None:
    assert RemoteConfig().reconnect_deadline < ACCEPT_TIMEOUT
    a, b = socket.socketpair()
    try:
        assert Handoff(a).accept_timeout == ACCEPT_TIMEOUT
    finally:
        a.close()
        b.close()


def test_no_timeout_means_no_bound_on_the_answer_either(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "h.sock"))
    listener.listen()
    try:
        with Handoff.connect(tmp_path / "h.sock", timeout=None) as h:
            assert h.accept_timeout is None
        with Handoff.connect(tmp_path / "h.sock", timeout=120.0) as h:
            assert h.accept_timeout == 120.0, "never shorter than the connect timeout"
        with Handoff.connect(tmp_path / "h.sock", timeout=1.0, accept_timeout=2.5) as h:
            assert h.accept_timeout == 2.5
    finally:
        listener.close()
