"""Pages from CRIU's own page server (``criu dump --lazy-pages --address --port``).

One TCP connection per restore carries the GETs of every task (each names
its image pid). Unlike CRIU's own lazy-pages daemon, which waits for each
reply before asking again, requests are pipelined: faults are sent at once,
background fill keeps up to ``bulk_window`` bytes outstanding, and the
replies, which the server sends in request order, are received straight
into fresh anonymous memory whose address goes into UFFDIO_COPY.

Faults cannot overtake bytes already on the wire, so the bulk window is the
bound on how long a fault waits behind fill: a few MiB, a few milliseconds
on a local network. Fill requests not yet sent wait behind every fault.

A server that replies with fewer pages than asked (it stops at the end of
one of its buffers) is asked again for the rest. A lost connection fails
every outstanding fetch with a SourceError: the sessions then stop serving
but keep their uffds, so the targets block rather than read zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from ..sources.base import Extent, PageSource, SourceError
from ..sources.raw import ZERO_CHECK_MAX, is_zero
from . import pageserver as ps

PAGE = ps.PAGE
#: Background bytes outstanding on the connection (see the module docstring).
DEFAULT_BULK_WINDOW = 8 << 20
#: Largest single GET; bigger fetches are split so faults can slip in between.
#: CRIU's server tees everything from the start of its pipe buffer up to the
#: end of the request for each GET, so big requests cost it less per byte
#: (about 0.4 s of its CPU per GiB at 512 KiB, 0.15-0.3 s at 1-2 MiB; 2 MiB
#: pulled as fast as 1 MiB or up to 15% faster here); 4 MiB brought nothing
#: more, and requests stay well inside its 4 MiB pipes.
DEFAULT_MAX_REQUEST = 2 << 20
#: Seconds to wait for the TCP connection to the page server.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for the page server's CLOSE acknowledgement.
CLOSE_TIMEOUT = 10.0


class _Buffer:
    """Anonymous memory pages are received into; its address never changes."""

    __slots__ = ("address", "cview", "map", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.cview = (ctypes.c_char * size).from_buffer(self.map)
        self.address = ctypes.addressof(self.cview)


class _Lease:
    """A buffer lent to one reply; it goes back to the pool when the last
    extent pointing into it is dropped (after the session installed it)."""

    __slots__ = ("buf", "pool")

    def __init__(self, buf: _Buffer, pool: _BufferPool) -> None:
        self.buf, self.pool = buf, pool

    def __del__(self) -> None:
        self.pool.give_back(self.buf)


class _BufferPool:
    """Reuses receive buffers: fresh anonymous memory costs a page fault per
    page on first write, which on a busy host competes with everything else."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self.free: list[_Buffer] = []

    def lease(self, nbytes: int) -> _Lease:
        if nbytes > self.size:
            return _Lease(_Buffer(nbytes), self)
        return _Lease(self.free.pop() if self.free else _Buffer(self.size), self)

    def give_back(self, buf: _Buffer) -> None:
        if buf.size == self.size and len(self.free) < self.keep:
            self.free.append(buf)


@dataclass
class _Request:
    pid: int
    vaddr: int
    nr_pages: int
    urgent: bool
    future: asyncio.Future[tuple[int, Any, int]]
    sent: bool = False


@dataclass
class _Stats:
    requests: int = 0
    partial_replies: int = 0
    bytes_received: int = 0
    max_inflight: int = 0
    in_flight: list[int] = field(default_factory=lambda: [0])


class _Receiver(asyncio.BufferedProtocol):
    """Reads headers into a small buffer and page data straight into its target."""

    def __init__(self, client: PageServerClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self._hdr = bytearray(32)
        self._want = 0
        self._got = 0
        self._payload: _Lease | None = None
        self._payload_req: tuple[ps.Pending, ps.Header] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return memoryview(self._payload.buf.map)[self._got : self._want]
        want = self.client.parser.need() or len(self._hdr)
        self._want = want
        return memoryview(self._hdr)[self._got : want]

    def buffer_updated(self, nbytes: int) -> None:
        self._got += nbytes
        if self._got < self._want:
            return
        try:
            self._complete()
        except ps.ProtocolError as e:
            self.client.fail(SourceError(f"page server {self.client.where}: {e}"))
            if self.transport is not None:
                self.transport.abort()

    def _complete(self) -> None:
        parser = self.client.parser
        self._got = 0
        if self._payload is not None:
            buf, self._payload = self._payload, None
            assert self._payload_req is not None
            req, h = self._payload_req
            self._payload_req = None
            parser.payload_done()
            self.client.reply(req, h, buf)
            return
        if parser.pending:
            req, h = parser.header(memoryview(self._hdr)[: parser.header_size])
            self._payload = self.client.pool.lease(h.nr_pages * PAGE)
            self._payload_req = (req, h)
            self._want = h.nr_pages * PAGE
            return
        if parser.closing:
            parser.close_ack(memoryview(self._hdr)[:4])
            self.client.closed_ack()
            return
        raise ps.ServerProtocolError("the page server sent data nobody asked for")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.client.fail(SourceError(f"page server {self.client.where} closed the connection{reason}"))
        if not self.lost.done():
            self.lost.set_result(None)


class PageServerClient:
    """One pipelined connection to a CRIU page server."""

    def __init__(
        self,
        host: str,
        port: int,
        layout: str,
        *,
        bulk_window: int = DEFAULT_BULK_WINDOW,
        max_request: int = DEFAULT_MAX_REQUEST,
        log: Any = None,
    ) -> None:
        self.where = f"{host}:{port}"
        self.host, self.port = host, port
        self.parser = ps.ReplyParser(layout)
        self.bulk_window = bulk_window
        self.max_request_pages = max(1, max_request // PAGE)
        #: Enough buffers for the bulk window plus faults in flight.
        self.pool = _BufferPool(self.max_request_pages * PAGE, bulk_window // max(max_request, PAGE) + 16)
        self.log = log
        self.stats = _Stats()
        self._proto: _Receiver | None = None
        self._urgent: deque[_Request] = deque()
        self._bulk: deque[_Request] = deque()
        self._sent: deque[_Request] = deque()
        self._bulk_bytes = 0
        self._error: SourceError | None = None
        self._close_ack: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _transport, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Receiver(self), self.host, self.port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            raise SourceError(f"cannot connect to the page server at {self.where}: {e}") from None
        sock = _transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._proto = proto

    # -- requests -----------------------------------------------------------------
    async def get(self, pid: int, vaddr: int, length: int, *, urgent: bool) -> list[Extent]:
        """Extents covering [vaddr, vaddr+length) of task ``pid``'s dump-time memory."""
        loop = asyncio.get_running_loop()
        futures = []
        pos, end = vaddr, vaddr + length
        while pos < end:
            n = min((end - pos) // PAGE, self.max_request_pages)
            futures.append((pos, n, self._submit(loop, pid, pos, n, urgent)))
            pos += n * PAGE
        out: list[Extent] = []
        for start, n, fut in futures:
            a, todo = start, n
            while True:
                got, buf, addr = await fut
                out.append(self._extent(a, got, buf, addr))
                a, todo = a + got * PAGE, todo - got
                if todo == 0:
                    break
                self.stats.partial_replies += 1
                fut = self._submit(loop, pid, a, todo, urgent)
        return out

    def _extent(self, vaddr: int, npages: int, buf: Any, addr: int) -> Extent:
        length = npages * PAGE
        if length <= ZERO_CHECK_MAX and is_zero(addr, length):
            return Extent(vaddr, length, 0)
        return Extent(vaddr, length, addr, buf)

    def _submit(
        self, loop: asyncio.AbstractEventLoop, pid: int, vaddr: int, n: int, urgent: bool
    ) -> asyncio.Future[tuple[int, Any, int]]:
        fut: asyncio.Future[tuple[int, Any, int]] = loop.create_future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        req = _Request(pid, vaddr, n, urgent, fut)
        (self._urgent if urgent else self._bulk).append(req)
        self._pump()
        return fut

    def _pump(self) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or self._error is not None:
            return
        out = []
        while self._urgent:
            out.append(self._send(self._urgent.popleft()))
        while self._bulk and (self._bulk_bytes == 0 or self._bulk_bytes < self.bulk_window):
            req = self._bulk.popleft()
            self._bulk_bytes += req.nr_pages * PAGE
            out.append(self._send(req))
        if out:
            proto.transport.write(b"".join(out))
            self.stats.max_inflight = max(self.stats.max_inflight, len(self._sent))

    def _send(self, req: _Request) -> bytes:
        self.parser.sent(ps.Pending(req.pid, req.vaddr, req.nr_pages))
        req.sent = True
        self._sent.append(req)
        self.stats.requests += 1
        return ps.encode_get(self.parser.layout, req.pid, req.vaddr, req.nr_pages)

    def reply(self, pending: ps.Pending, h: ps.Header, lease: _Lease) -> None:
        req = self._sent.popleft()
        if not req.urgent:
            self._bulk_bytes -= req.nr_pages * PAGE
        self.stats.bytes_received += h.nr_pages * PAGE
        if not req.future.done():
            req.future.set_result((h.nr_pages, lease, lease.buf.address))
        self._pump()

    # -- ending -------------------------------------------------------------------
    def fail(self, err: SourceError) -> None:
        if self._error is None and (self._close_ack is None or not self._close_ack.done()):
            self._error = err
            if self.log is not None and (self._sent or self._urgent or self._bulk):
                self.log.error("page_server_lost", server=self.where, error=str(err))
        for q in (self._sent, self._urgent, self._bulk):
            while q:
                r = q.popleft()
                if not r.future.done():
                    r.future.set_exception(err)
        if self._close_ack is not None and not self._close_ack.done():
            self._close_ack.set_exception(err)

    def closed_ack(self) -> None:
        if self._close_ack is not None and not self._close_ack.done():
            self._close_ack.set_result(None)

    async def close(self, *, graceful: bool = True) -> bool:
        """Say CLOSE (the dump then finishes and exits 0) and hang up.

        Returns whether the server acknowledged. With ``graceful=False`` the
        connection is just dropped (the dump then fails and its task is
        left as the dump's error handling decides).
        """
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return False
        ok = False
        if graceful and self._error is None and not self._sent:
            self._close_ack = asyncio.get_running_loop().create_future()
            self.parser.sent_close()
            proto.transport.write(ps.encode_close(self.parser.layout))
            # The server answers CLOSE and then waits for us to hang up; it
            # may hold the answer back (corked) until then. Half-close now, so
            # it sees both at once and the answer is not delayed.
            if proto.transport.can_write_eof():
                proto.transport.write_eof()
            try:
                await asyncio.wait_for(asyncio.shield(self._close_ack), CLOSE_TIMEOUT)
                ok = True
            except (SourceError, TimeoutError) as e:
                if self.log is not None:
                    self.log.warning("page_server_close_unacknowledged", server=self.where, error=str(e))
        proto.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proto.lost), 5.0)
        return ok


class RemoteTaskSource(PageSource):
    """One task's dump-time memory on a page server: offsets are addresses."""

    synchronous = False

    def __init__(self, client: PageServerClient, pid: int) -> None:
        self.client = client
        self.pid = pid
        self.name = f"criu-page-server:{client.where}:{pid}"
        self.size = 1 << 64

    def extents(self, offset: int, length: int) -> list[Extent]:
        raise SourceError(f"{self.name}: a remote source can only be fetched asynchronously")

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        return await self.client.get(self.pid, offset, length, urgent=False)

    async def fetch_urgent(self, offset: int, length: int, owner: object = None) -> list[Extent]:
        return await self.client.get(self.pid, offset, length, urgent=True)

    def close(self) -> None:
        pass
