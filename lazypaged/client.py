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
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
from collections.abc import Iterable, Sequence
from types import TracebackType

from . import handoff_protocol as hp
from .uffd import Userfaultfd

DEFAULT_SOCKET = "/run/lazypaged/handoff.sock"


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

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session: str | None = None
        self._decoder = hp.FrameDecoder()
        self._queue: list[hp.Message] = []  # decoded, not yet returned
        self._uffd: Userfaultfd | None = None

    @classmethod
    def connect(cls, path: str | os.PathLike[str] = DEFAULT_SOCKET, timeout: float | None = 30.0) -> Handoff:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
        except BaseException:
            s.close()
            raise
        return cls(s)

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
        frame = hp.encode(req)
        socket.send_fds(self.sock, [frame[:1]], [uffd.fileno()])
        self.sock.sendall(frame[1:])
        reply = self._recv()
        if isinstance(reply, hp.Error):
            raise HandoffError(reply.code, reply.message)
        if not isinstance(reply, hp.Accepted):
            raise HandoffError("malformed", f"unexpected reply {reply!r}")
        self.session = reply.session
        if keep_uffd:
            self._uffd = uffd
        else:
            uffd.close()
        return reply.session

    def wait(self, timeout: float | None = None) -> hp.Complete:
        """Block until the daemon reports the restore complete (or failed)."""
        self.sock.settimeout(timeout)
        reply = self._recv()
        if isinstance(reply, hp.Failed):
            raise HandoffError(reply.code, reply.message)
        if not isinstance(reply, hp.Complete):
            raise HandoffError("malformed", f"unexpected reply {reply!r}")
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
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


def restore(
    socket_path: str | os.PathLike[str],
    ranges: Sequence[hp.RangeSpec | tuple[int, int, str, int]],
    *,
    features: int = 0,
    options: hp.SessionOptions | None = None,
    keep_uffd: bool = True,
) -> Handoff:
    """Create a uffd for this process, hand ``ranges`` over, return the open handoff.

    ``ranges`` are (address, length, snapshot name, offset in the snapshot).
    The daemon registers them; they must be mapped and not yet touched.
    """
    uffd = Userfaultfd.create()
    try:
        uffd.api(features)
        h = Handoff.connect(socket_path)
    except BaseException:
        uffd.close()
        raise
    try:
        h.send(uffd, ranges, options=options, keep_uffd=keep_uffd)
    except BaseException:
        h.close()
        uffd.close()
        raise
    return h
