"""Python client for restorers: map memory, hand its uffd to lazypaged, wait.

Typical use in the process being restored::

    mem, addr = map_anonymous(size)
    with restore("/run/lazypaged/handoff.sock", [(addr, size, "app.img", 0)]) as r:
        ...  # touch mem right away: pages arrive on demand
        r.wait()  # optional: block until every page is in

The client keeps its own copy of the uffd until the restore completes. While
that copy is open, a daemon that dies leaves the target's missing pages
*blocked* (a new daemon can serve them) instead of letting the kernel fill
them with zeros.

With ``reconnect=`` seconds, a watcher thread follows the handoff
connection: when it drops before the restore completed (the daemon was
killed, crashed or shut down), the watcher connects again — retrying for
that long — and re-hands the same uffd and ranges to the new daemon as
already registered. Pages present answer EEXIST there and count as
installed; the re-handed session always fills, so it learns which pages are
in without waiting for faults that will never come. Threads whose faults
the dead daemon had read but not served are woken once the new daemon has
accepted: they fault again and the new daemon serves them. See
``docs/reliability.md`` for what a target experiences meanwhile.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

from . import handoff_protocol as hp
from .uffd import Userfaultfd

DEFAULT_SOCKET = "/run/lazypaged/handoff.sock"
#: Pause between attempts to reach a restarting daemon: first, then doubling up to the max.
RECONNECT_DELAY_FIRST, RECONNECT_DELAY_MAX = 0.02, 0.5
#: Refusals that mean "try again later", not "this restore is wrong".
_TRANSIENT = frozenset({"busy", "disconnected", "timeout", "internal_error"})
#: The helper's report: re-handoff count ahead of the final frame.
_COUNT = struct.Struct(">I")
#: struct timeval, for SO_SNDTIMEO.
_TIMEVAL = struct.Struct("@ll")
#: Seconds to wait for ``accepted`` (or ``error``) once the request is sent.
#: Longer than the daemon's default [remote] reconnect_deadline (60 s): a
#: peer:// source whose link is down at handoff is waited for that long
#: before the daemon answers, and the restorer must not give up first.
ACCEPT_TIMEOUT = 90.0


class _Unset:
    """Marks ``accept_timeout`` left at its default (which depends on ``timeout``)."""


_UNSET = _Unset()


class HandoffError(Exception):
    """The daemon refused the request or the restore failed; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def map_anonymous(length: int, *, shared: bool = False) -> tuple[mmap.mmap, int]:
    """Map ``length`` bytes of private (or shared) anonymous memory; return it and its address."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    mem = mmap.mmap(-1, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mem, address_of(mem)


def address_of(buf: mmap.mmap) -> int:
    """Address of a writable mmap's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Handoff:
    """One handoff connection (one restore)."""

    def __init__(self, sock: socket.socket, accept_timeout: float | None = ACCEPT_TIMEOUT) -> None:
        self.sock = sock
        #: Bound on the wait for the daemon's answer to the request (None: none).
        self.accept_timeout = accept_timeout
        self.session: str | None = None
        self._decoder = hp.FrameDecoder()
        self._queue: list[hp.Message] = []  # decoded, not yet returned
        self._uffd: Userfaultfd | None = None
        # Kept for re-handing the uffd to a restarted daemon (see the module doc).
        self._path = ""
        self._request: hp.RestoreRequest | None = None
        self._helper: subprocess.Popen[bytes] | None = None
        self._outcome: hp.Complete | HandoffError | None = None
        #: How often a helper handed the uffd to a new daemon (known at the end).
        self.rehandoffs = 0

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] = DEFAULT_SOCKET,
        timeout: float | None = 30.0,
        accept_timeout: float | _Unset | None = _UNSET,
    ) -> Handoff:
        """Connect to the daemon.

        ``timeout`` bounds connecting and sending the request;
        ``accept_timeout`` the wait for the answer, which the daemon may
        delay up to its ``reconnect_deadline`` for a peer:// source (default
        :data:`ACCEPT_TIMEOUT`, or no bound when ``timeout`` is None).
        """
        if isinstance(accept_timeout, _Unset):
            accept_timeout = None if timeout is None else max(timeout, ACCEPT_TIMEOUT)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connect_unix(s, path, timeout)
        except BaseException:
            s.close()
            raise
        return cls(s, accept_timeout)

    def send(
        self,
        uffd: Userfaultfd,
        ranges: Iterable[hp.RangeSpec | tuple[int, int, str, int]],
        *,
        registered: bool = False,
        keep_uffd: bool = True,
        pid: int | None = None,
        options: hp.SessionOptions | None = None,
    ) -> str:
        """Send the request with the uffd attached; return the session id.

        With ``keep_uffd`` (the default) the uffd stays open here until
        :meth:`wait` sees the restore complete; otherwise it is closed once
        the daemon has accepted it.
        """
        specs = tuple(r if isinstance(r, hp.RangeSpec) else hp.RangeSpec(*r) for r in ranges)
        req = hp.RestoreRequest(
            ranges=specs,
            registered=registered,
            features=uffd.features,
            pid=pid,
            keeps_uffd=keep_uffd,
            options=options or hp.SessionOptions(),
        )
        self.session = self._handshake(req, uffd)
        self._request = req
        if keep_uffd:
            self._uffd = uffd
        else:
            uffd.close()
        return self.session

    def _handshake(self, req: hp.RestoreRequest, uffd: Userfaultfd) -> str:
        frame = hp.encode(req)
        try:
            socket.send_fds(self.sock, [frame[:1]], [uffd.fileno()])
            self.sock.sendall(frame[1:])
        except OSError as e:
            # A daemon that turned the connection away at once (busy) wrote
            # why before closing: that is the answer, not the broken pipe.
            refusal = self._refusal_left()
            if refusal is not None:
                raise HandoffError(refusal.code, refusal.message) from None
            raise HandoffError("disconnected", f"sending the request failed: {e.strerror or e}") from None
        sending = self.sock.gettimeout()
        self.sock.settimeout(self.accept_timeout)
        try:
            reply = self._recv()
        except TimeoutError:
            raise TimeoutError(f"no answer to the restore request within {self.accept_timeout} s") from None
        finally:
            self.sock.settimeout(sending)
        if isinstance(reply, hp.Error):
            raise HandoffError(reply.code, reply.message)
        if not isinstance(reply, hp.Accepted):
            raise HandoffError("malformed", f"unexpected reply {reply!r}")
        return reply.session

    def _refusal_left(self) -> hp.Error | None:
        """An error frame already waiting on a connection the daemon closed, if any."""
        try:
            reply = self._recv()
        except (OSError, HandoffError, hp.ProtocolError):
            return None
        return reply if isinstance(reply, hp.Error) else None

    def watch(self, path: str | os.PathLike[str], reconnect: float) -> None:
        """Follow the restore from a helper process; re-hand the uffd if the daemon goes away.

        The helper (``python -m lazypaged.rehand``) gets the handoff
        connection and a copy of the uffd. It must be a process of its own:
        while no daemon serves, a thread of ours touching lazy memory blocks
        in the kernel *holding the interpreter lock*, so no thread here could
        run to reconnect. ``reconnect`` bounds each outage: how long the
        helper tries to reach a daemon again before giving up (our uffd copy
        stays open even then: the target blocks rather than reading zeros).
        """
        if self._uffd is None or self._request is None:
            raise ValueError("watch() needs a restore sent with keep_uffd=True")
        if self._helper is not None:
            raise ValueError("already watching")
        if self._queue:  # a small restore: the end arrived with the acceptance
            reply = self._queue.pop(0)
            if isinstance(reply, hp.Complete):
                self._outcome = reply
                self._release_uffd()
            else:
                self._outcome = HandoffError(getattr(reply, "code", "malformed"), getattr(reply, "message", ""))
            return
        conn = self.sock.fileno()
        uffd = self._uffd.fileno()
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "lazypaged.rehand", "--uffd", str(uffd), "--conn", str(conn),
             "--socket", os.fspath(path), "--reconnect", repr(reconnect), "--target", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(uffd, conn),
            start_new_session=True,  # a terminal's ^C is for the target, not its helper
        )
        assert self._helper.stdin is not None
        self._helper.stdin.write(hp.encode(self._request))
        self._helper.stdin.close()
        self.sock.close()  # the helper has the connection now

    def _wait_helper(self, timeout: float | None) -> hp.Complete:
        helper = self._helper
        assert helper is not None
        assert helper.stdout is not None
        if self._outcome is None:
            if timeout is not None:
                ready, _, _ = select.select([helper.stdout], [], [], timeout)
                if not ready:
                    raise TimeoutError(f"restore not complete within {timeout} s")
            # The helper writes how often it re-handed (4 bytes), one frame, and exits.
            data = helper.stdout.read()
            helper.wait()
            if len(data) >= _COUNT.size:
                (self.rehandoffs,) = _COUNT.unpack_from(data)
            try:
                msgs = hp.FrameDecoder().feed(data[_COUNT.size :])
            except hp.ProtocolError as e:
                msgs = [hp.Failed(self.session or "-", "internal_error", f"helper reply unreadable: {e}")]
            if not msgs:
                msgs = [hp.Failed(self.session or "-", "internal_error", f"helper exited ({helper.returncode})")]
            reply = msgs[-1]
            if isinstance(reply, hp.Complete):
                self._outcome = reply
                self._release_uffd()
            elif isinstance(reply, hp.Failed | hp.Error):
                self._outcome = HandoffError(reply.code, reply.message)
            else:
                self._outcome = HandoffError("malformed", f"unexpected reply {reply!r}")
        if isinstance(self._outcome, HandoffError):
            raise self._outcome
        return self._outcome

    def _release_uffd(self) -> None:
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None

    def wait(self, timeout: float | None = None) -> hp.Complete:
        """Block until the daemon reports the restore complete (or failed)."""
        if self._helper is not None:
            return self._wait_helper(timeout)
        self.sock.settimeout(timeout)
        reply = self._recv()
        if isinstance(reply, hp.Failed):
            raise HandoffError(reply.code, reply.message)
        if not isinstance(reply, hp.Complete):
            raise HandoffError("malformed", f"unexpected reply {reply!r}")
        self._release_uffd()
        return reply

    def _recv(self) -> hp.Message:
        # One read may carry several replies (accepted and complete of a
        # small restore): keep the rest for the next call.
        while not self._queue:
            data = self.sock.recv(65536)
            if not data:
                raise HandoffError("disconnected", "the daemon closed the connection")
            self._queue.extend(self._decoder.feed(data))
        return self._queue.pop(0)

    def close(self) -> None:
        """Close the connection. A kept uffd stays open (see the module doc)."""
        self.sock.close()

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def connect_unix(sock: socket.socket, path: str | os.PathLike[str], timeout: float | None) -> None:
    """connect() that waits up to ``timeout`` for room in a full listen backlog.

    A Unix socket in non-blocking mode (which is how Python implements a
    socket timeout) fails with EAGAIN at once when the listener's backlog
    is full. A blocking connect waits for room instead, for as long as
    SO_SNDTIMEO allows; the socket gets ``timeout`` for everything after.
    """
    if timeout is not None and timeout <= 0:
        sock.settimeout(0)
        sock.connect(os.fspath(path))
        return
    sock.settimeout(None)
    if timeout is not None:
        whole = int(timeout)
        usec = int((timeout - whole) * 1_000_000) or (0 if whole else 1)  # 0 s 0 µs would mean "forever"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(whole, usec))
    try:
        sock.connect(os.fspath(path))
    except BlockingIOError:
        raise TimeoutError(
            f"cannot connect to {os.fspath(path)} within {timeout} s: its listen backlog stayed full"
        ) from None
    finally:
        if timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
    sock.settimeout(timeout)


def restore(
    socket_path: str | os.PathLike[str],
    ranges: Sequence[hp.RangeSpec | tuple[int, int, str, int]],
    *,
    features: int = 0,
    options: hp.SessionOptions | None = None,
    keep_uffd: bool = True,
    reconnect: float = 0.0,
    accept_timeout: float | None = ACCEPT_TIMEOUT,
) -> Handoff:
    """Create a uffd for this process, hand ``ranges`` over, return the open handoff.

    ``ranges`` are (address, length, snapshot name, offset in the snapshot).
    The daemon registers them; they must be mapped and not yet touched.

    With ``reconnect`` > 0 (and ``keep_uffd``) a daemon that is not there
    yet is waited for up to that long, and a daemon lost mid-restore is
    replaced by the next one (see :meth:`Handoff.watch`).

    ``accept_timeout`` bounds each wait for the daemon's answer to the
    request (see :meth:`Handoff.connect`).
    """
    if reconnect > 0 and not keep_uffd:
        raise ValueError("reconnect needs keep_uffd: only a kept uffd can be handed over again")
    uffd = Userfaultfd.create()
    try:
        uffd.api(features)
        if reconnect <= 0:
            h = Handoff.connect(socket_path, accept_timeout=accept_timeout)
    except BaseException:
        uffd.close()
        raise
    if reconnect > 0:
        specs = tuple(r if isinstance(r, hp.RangeSpec) else hp.RangeSpec(*r) for r in ranges)
        req = hp.RestoreRequest(
            ranges=specs, features=uffd.features, keeps_uffd=True, options=options or hp.SessionOptions()
        )
        h = Handoff(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC), accept_timeout)
        try:
            # Registering again with the same uffd is allowed: a daemon that
            # died after registering but before answering leaves no trap.
            h.session = _retry_handshake(h, socket_path, req, uffd, reconnect)
        except BaseException:
            h.close()
            uffd.close()
            raise
        h._request, h._uffd = req, uffd
        h.watch(socket_path, reconnect)
        return h
    try:
        h.send(uffd, ranges, options=options, keep_uffd=keep_uffd)
    except BaseException:
        h.close()
        uffd.close()
        raise
    return h


def _retry_handshake(
    h: Handoff, path: str | os.PathLike[str], req: hp.RestoreRequest, uffd: Userfaultfd, within: float
) -> str:
    """Connect and hand ``uffd`` over, retrying transient failures for ``within`` s.

    Replaces ``h``'s connection each attempt; returns the session id. A
    refusal that is not transient (a bad range, an unknown snapshot) is
    raised at once: retrying cannot fix it.
    """
    deadline = time.monotonic() + within
    delay = RECONNECT_DELAY_FIRST
    last = "no attempt made"
    while True:
        h.sock.close()
        h.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        h._decoder = hp.FrameDecoder()
        h._queue.clear()
        try:
            connect_unix(h.sock, path, max(1.0, min(30.0, within)))
            return h._handshake(req, uffd)
        except HandoffError as e:
            if e.code not in _TRANSIENT:
                raise
            last = str(e)
        except OSError as e:  # no daemon listening yet, or it died while answering
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() + delay > deadline:
            raise HandoffError("unreachable", f"no daemon took the restore within {within} s (last: {last})")
        time.sleep(delay)
        delay = min(delay * 2, RECONNECT_DELAY_MAX)
