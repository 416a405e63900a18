"""Pages from another lazypaged: the source behind ``peer://HOST:PORT/NAME``.

Theory of operation.

* One :class:`Peer` per HOST:PORT, shared by every source (and so every
  session) that reads from it. A peer has two links, each one TCP (or TLS)
  connection: ``urgent`` carries the reads of faulting threads
  (:meth:`RemoteSource.fetch_urgent`), ``bulk`` the background fill. The
  urgent link never queues behind bulk data: not in our queues, not in the
  exporter's, not in either kernel's socket buffers.
* A link pipelines reads (up to the window the exporter announced) and
  receives DATA straight into pooled buffers, which become the extents'
  memory (``Extent.owner`` keeps a buffer out of the pool until installed).
  Every byte was verified against its checksum by the protocol core first.
* When a link drops (reset, EOF, or nothing received for
  ``stall_timeout`` while reads are outstanding) it reconnects with
  exponential backoff, re-opens its exports, checks that each is still the
  same image (its identity), and sends again every read that was in flight.
  Callers just keep waiting: a faulting thread stays blocked, it never sees
  an error for a blip. The deadline is counted from the loss (for a stall:
  from the last byte received), not from each read: once the link has been
  down for ``reconnect_deadline`` the reads waiting on it fail with
  SourceError, and every read asked of it later fails at once, until a
  connection succeeds again (the link keeps trying, ``backoff_max`` apart).
  The failure policy then decides; a failed read never becomes zeros.
* The first contact with an export (its size and identity, needed before a
  handoff can be accepted) rides out a link that is down the same way:
  :meth:`PeerPool.acquire_async` retries it with the same backoff until
  ``reconnect_deadline`` has passed, whatever the failure policy, then
  refuses with the last error.
* Refusals that retrying cannot fix fail at once: a TLS handshake the peer
  or we rejected, no common protocol version, an export that is gone or
  now holds another image.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from .. import peer_protocol as pp
from ..config import RemoteConfig
from ..peer_tls import AddressError, client_context, parse_peer_url, plaintext_allowed
from .base import Extent, PageSource, SourceError

#: Reads are cut into pieces of at most this many bytes.
READ_PIECE = 4 << 20
#: Smallest pooled receive buffer; buffers come in powers of two from here.
_MIN_BUFFER = 64 << 10
#: Idle receive buffers kept for reuse (fresh ones page-fault their way in).
_POOL_BYTES = 64 << 20
_BACKOFF_START = 0.05
#: Faulting threads count as active this long after their last small urgent
#: read completed: a thread that just faulted is likely to fault again soon.
FAULT_LINGER = 0.005
#: Urgent reads up to this size are latency-bound (scattered faults) and
#: slow the fill down; bigger ones (fault-around windows of a thread walking
#: through memory) do not: the fill running ahead of such a thread saves it
#: faults, so it helps more than it delays.
SMALL_URGENT = 64 << 10
#: A bulk completion this close to the last urgent read is handed out at
#: once even while faults are recent: the faulting thread is walking into
#: that range, and may already wait for exactly this fill chunk.
NEAR_URGENT = 8 << 20
#: While they are active, bulk completions (each an install of up to a fill
#: chunk, a millisecond or so of the loop) are handed out at most this often.
BULK_GAP = 0.008


class PeerUnavailable(SourceError):
    """The peer cannot be reached, or refused us for good."""


class _NoAnswer(PeerUnavailable):
    """No connection, or no answer: what a link that is down looks like, so
    worth retrying (a refusal is not)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- receive buffers --------------------------------------------------------------------


class _RecvBuffer:
    """Memory one read's data lands in; back to the pool when nothing refers to it."""

    __slots__ = ("address", "data", "pool", "view")

    def __init__(self, data: bytearray, length: int, pool: _BufferPool) -> None:
        self.data = data
        self.view = memoryview(data)[:length]
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        self.pool = pool

    def __del__(self) -> None:
        self.pool.give_back(self.data)


class _BufferPool:
    def __init__(self, keep_bytes: int = _POOL_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self.idle = 0
        self._free: dict[int, list[bytearray]] = {}

    def take(self, length: int) -> _RecvBuffer:
        size = max(_MIN_BUFFER, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            data = free.pop()
            self.idle -= size
        else:
            data = bytearray(size)
        return _RecvBuffer(data, length, self)

    def give_back(self, data: bytearray) -> None:
        if self.idle + len(data) <= self.keep_bytes:
            self._free.setdefault(len(data), []).append(data)
            self.idle += len(data)

    def clear(self) -> None:
        self.keep_bytes = 0
        self._free.clear()
        self.idle = 0


# -- exports, reads ------------------------------------------------------------------------


@dataclass
class _ExportInfo:
    name: str
    handle: int
    size: int
    identity: bytes
    #: Why this export can no longer be read (it vanished or changed), or "".
    broken: str = ""


@dataclass
class _Pending:
    export: _ExportInfo
    offset: int
    length: int
    future: asyncio.Future[pp.ReadDone]
    attempts: int = 0
    #: Streamed reads: called with each verified piece as it arrives.
    sink: Callable[[list[Extent]], None] | None = None
    #: A piece could not be handed to ``sink`` (not whole pages).
    partial: bool = False
    #: The session reading (see PageSource.fetch_urgent), or None.
    owner: object = None


class _Permanent(Exception):
    """A refusal that retrying will not change."""


# -- one connection ---------------------------------------------------------------------------


class _LinkProtocol(asyncio.BufferedProtocol):
    def __init__(self, link: _Link) -> None:
        self.link = link
        self.conn = pp.ClientConnection(
            link.role,
            encodings=pp.ENCODINGS if link.peer.pool.cfg.compression else (),
            alloc=link.peer.pool.buffers.take,
            client=link.peer.client_id,
        )
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.welcomed: asyncio.Future[pp.Welcome] = loop.create_future()
        self.last_rx = loop.time()
        self.opened: set[int] = set()
        self.error: str = ""
        self.pinged = False
        #: Set by the stall watchdog: the link died when it fell silent, not when noticed.
        self.silent_since: float | None = None
        #: A PING sent to check an idle connection (see _Link.check_alive), and since when
        #: the connection is suspect (the other link of the peer fell silent then).
        self.checking = False
        self.suspect_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self.transport = cast(asyncio.Transport, transport)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        self.pinged = False
        self.checking = False
        self.suspect_since = None
        if self.conn.buffer_updated(nbytes):
            self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.error:
            self.error = _describe(exc)
        if not self.welcomed.done():
            if isinstance(exc, ssl.SSLError):
                self.welcomed.set_exception(_Permanent(f"TLS refused: {_describe(exc)}"))
            else:
                self.welcomed.set_exception(ConnectionError(self.error or "connection closed during the handshake"))
            self.welcomed.exception()
        self.link._lost(self, self.error or "connection closed by the peer")

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def hold(self, on: bool) -> None:
        """Stop (or resume) taking bytes off the socket."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if on:
            t.pause_reading()
        else:
            self.last_rx = asyncio.get_running_loop().time()
            t.resume_reading()

    def abort(self, why: str) -> None:
        if not self.error:
            self.error = why
        if self.transport is not None:
            self.transport.abort()

    def _process(self) -> None:
        try:
            while True:
                ev = self.conn.next_event()
                if ev is pp.NEED_DATA:
                    break
                if ev is pp.CLOSED:
                    self.abort("the peer closed the connection")
                    break
                self._handle(ev)
        except pp.RemoteProtocolError as e:
            self.link.log.warning("peer_protocol_error", error=str(e))
            self.abort(f"protocol error: {e}")
            if not self.welcomed.done():
                self.welcomed.set_exception(_Permanent(f"protocol error: {e}"))
                self.welcomed.exception()
        self.flush()

    def _handle(self, ev: object) -> None:
        link = self.link
        if isinstance(ev, pp.ReadPiece):
            link._piece(ev)
        elif isinstance(ev, pp.ReadDone):
            link._done(ev)
        elif isinstance(ev, pp.ReadFailed):
            link._failed(ev)
        elif isinstance(ev, pp.Welcome):
            self.welcomed.set_result(ev)
        elif isinstance(ev, pp.Opened):
            link.peer._opened(ev)
        elif isinstance(ev, pp.OpenFailed):
            link.peer._open_failed(ev)
        elif isinstance(ev, pp.PeerError):
            self.error = f"the peer refused: {ev.reason}: {ev.message}"
            if not self.welcomed.done():
                exc: Exception = (
                    _Permanent(self.error)
                    if ev.code in (pp.ErrorCode.AUTH, pp.ErrorCode.VERSION, pp.ErrorCode.PROTOCOL)
                    else ConnectionError(self.error)
                )
                self.welcomed.set_exception(exc)
                self.welcomed.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _Link:
    """One role's connection to a peer, re-established as often as needed."""

    def __init__(self, peer: Peer, role: str) -> None:
        self.peer = peer
        self.role = role
        self.log = peer.log.bind(role=role)
        self.queue: deque[_Pending] = deque()
        self.sent: dict[int, _Pending] = {}
        self.proto: _LinkProtocol | None = None
        self.connector: asyncio.Task[None] | None = None
        #: Loop time the link was lost (or its first connect began); None while up.
        self.down_since: float | None = None
        #: Why reads fail at once: down past the deadline (until it connects again).
        self.unreachable = ""
        self._deadline: asyncio.TimerHandle | None = None
        self.last_error = ""
        self.closed = False
        self.connects = 0
        self._tick: asyncio.TimerHandle | None = None
        self._deliveries: deque[tuple[_Pending, pp.ReadDone]] = deque()
        self._delivery_due = False
        self._last_delivery = 0.0
        #: Bulk only: a faulting thread waits on the urgent link (see :meth:`hold`).
        self.held = False
        #: Bulk only: not reading for a moment after a streamed piece (see :meth:`_piece`).
        self._gap: asyncio.TimerHandle | None = None

    async def read(
        self,
        export: _ExportInfo,
        offset: int,
        length: int,
        sink: Callable[[list[Extent]], None] | None = None,
        owner: object = None,
    ) -> _Pending:
        """Read [offset, offset+length) of ``export``; the completed
        request (its future holds the :class:`pp.ReadDone`)."""
        if export.broken:
            raise SourceError(export.broken)
        if self.closed:
            raise SourceError(f"{self.peer.label}: source closed")
        if self.unreachable:
            self._ensure_connecting()
            raise SourceError(self._unreachable_message())
        fut: asyncio.Future[pp.ReadDone] = asyncio.get_running_loop().create_future()
        p = _Pending(export, offset, length, fut, sink=sink, owner=owner)
        self.queue.append(p)
        self._pump()
        await fut
        return p

    def warm(self) -> None:
        """Connect now (no read waiting yet), so the first fault does not pay for it."""
        if self.proto is None:
            self._ensure_connecting()

    def _pump(self) -> None:
        self._send_queued()
        if self.role == "urgent":
            self.peer.prioritize()

    def _send_queued(self) -> None:
        proto = self.proto
        if proto is None:
            self._ensure_connecting()
            return
        conn = proto.conn
        if not self.sent and self.queue:
            # Nothing was expected until now: the silence before does not count.
            proto.last_rx = asyncio.get_running_loop().time()
        while self.queue and conn.inflight < conn.max_inflight:
            p = self.queue.popleft()
            if p.future.done():
                continue
            if p.export.broken:
                _fail(p, p.export.broken)
                continue
            if p.export.handle not in proto.opened:
                conn.open(p.export.handle, p.export.name)
                proto.opened.add(p.export.handle)
            try:
                rid = conn.read(p.export.handle, p.offset, p.length, stream=p.sink is not None)
            except pp.LocalProtocolError as e:
                _fail(p, f"{self.peer.label}: {e}")
                continue
            self.sent[rid] = p
        proto.flush()
        self._arm()

    def _ensure_connecting(self) -> None:
        if self.connector is None and not self.closed:
            self.connector = asyncio.get_running_loop().create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        """Connect, with backoff, until it works or the link is closed.

        The deadline is not checked here but by a timer from the moment the
        link went down (:meth:`_went_down`): an attempt hanging in
        ``connect_timeout`` must not push it back, nor must a read that
        arrives later restart it. Past the deadline the loop goes on, so a
        peer that comes back is found again."""
        loop = asyncio.get_running_loop()
        cfg = self.peer.pool.cfg
        delay = _BACKOFF_START
        if self.down_since is None:
            self._went_down(loop.time())
        try:
            while not self.closed:
                try:
                    proto = await self._connect_once()
                except _Permanent as e:
                    self.last_error = str(e)
                    self.log.error("peer_refused_us", error=str(e))
                    self._fail_all(f"{self.peer.label}: {e}")
                    self._came_back()
                    return
                except (OSError, TimeoutError, ConnectionError) as e:
                    self.last_error = (
                        _describe(e) if not isinstance(e, TimeoutError) else "connection attempt timed out"
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cfg.backoff_max)
                    continue
                self.proto = proto
                if self.paused:
                    proto.hold(True)
                self.connects += 1
                assert self.down_since is not None
                self.log.info(
                    "peer_link_up",
                    connects=self.connects,
                    down_s=round(loop.time() - self.down_since, 3) if self.connects > 1 or self.unreachable else None,
                    resent=len(self.queue),
                )
                self._came_back()
                self._pump()
                return
        finally:
            self.connector = None

    def _went_down(self, since: float) -> None:
        """Start the deadline clock at ``since``: the link is lost from then."""
        self.down_since = since
        if self._deadline is not None:
            self._deadline.cancel()
        due = since + self.peer.pool.cfg.reconnect_deadline
        self._deadline = asyncio.get_running_loop().call_at(due, self._deadline_passed)

    def _came_back(self) -> None:
        self.down_since = None
        self.unreachable = ""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        """Down for ``reconnect_deadline``: fail what waits, and what comes, at once."""
        self._deadline = None
        if self.proto is not None or self.down_since is None or self.closed:
            return
        self.unreachable = self.last_error or "no connection yet"
        message = self._unreachable_message()
        self.log.error(
            "peer_unreachable",
            waited_s=round(asyncio.get_running_loop().time() - self.down_since, 3),
            failed_reads=len(self.queue) + len(self.sent),
            error=self.last_error,
        )
        self._fail_all(message)

    def _unreachable_message(self) -> str:
        assert self.down_since is not None
        waited = asyncio.get_running_loop().time() - self.down_since
        return (
            f"{self.peer.label}: no connection for {waited:.1f} s (deadline "
            f"{self.peer.pool.cfg.reconnect_deadline} s); last error: {self.last_error or 'none yet'}"
        )

    async def _connect_once(self) -> _LinkProtocol:
        peer, cfg = self.peer, self.peer.pool.cfg
        loop = asyncio.get_running_loop()
        ctx = peer.pool.ssl
        kw: dict[str, Any] = {}
        if ctx is not None:
            kw = {
                "ssl": ctx,
                "server_hostname": cfg.server_name or peer.host,
                "ssl_handshake_timeout": cfg.connect_timeout,
            }

        async def attempt() -> _LinkProtocol:
            proto: _LinkProtocol | None = None
            try:
                sock = await self._dial(loop)
                _, proto = await loop.create_connection(lambda: _LinkProtocol(self), sock=sock, **kw)
                await proto.welcomed
                return proto
            except ssl.SSLError as e:
                raise _Permanent(f"TLS handshake failed: {_describe(e)}") from None
            except BaseException:
                if proto is not None:
                    proto.abort("connection attempt abandoned")
                raise

        return await asyncio.wait_for(attempt(), cfg.connect_timeout)

    async def _dial(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A connected TCP socket, tuned before connecting: no Nagle, and for
        the bulk link a bounded receive buffer (``bulk_window``). The bulk
        bytes in flight are what an urgent reply can queue behind in the
        kernels; the window bounds them (and bounds the bulk throughput to
        window ÷ round trip: raise it for long, fat links)."""
        peer = self.peer
        infos = await loop.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {peer.host}")
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            window = peer.pool.cfg.bulk_window
            if self.role == "bulk" and window:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
            await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _lost(self, proto: _LinkProtocol, why: str) -> None:
        if self.proto is not proto:
            return
        self.proto = None
        self._disarm()
        waiting = [p for p in self.sent.values() if not p.future.done()]
        self.sent.clear()
        self.queue.extendleft(reversed(waiting))
        if self.role == "urgent":
            self.peer.prioritize()
        if self.closed:
            return
        self.log.warning("peer_link_down", error=why, waiting=len(self.queue))
        sibling = self.peer.bulk if self.role == "urgent" else self.peer.urgent
        sibling.check_alive(proto.silent_since)
        # Reconnect at once even with nothing waiting: the deadline runs from
        # the loss, so a read that comes later must find the link back, or
        # fail at once, not wait a whole deadline of its own.
        now = asyncio.get_running_loop().time()
        since = proto.silent_since
        self._went_down(min(now, since) if since is not None else now)
        self._ensure_connecting()

    def _piece(self, ev: pp.ReadPiece) -> None:
        """Hand a verified piece of a streamed read to its sink, now: its
        bytes are reused for the next frame. Pieces that are not whole pages
        cannot be installed as they are; the reader fetches those again
        plainly (``partial``).

        While another restore's faults are recent, the bulk socket then
        rests, ``BULK_GAP`` per 2 MiB installed (as completions of plain reads
        are spaced, see :meth:`_schedule_delivery`), unless the faulting
        thread is walking into this range. A restore's own fill is not held
        back for its own faults: it installs what those threads would fault
        on next (a program faulting at random took 2.5× longer with it held)."""
        p = self.sent.get(ev.request_id)
        if p is None or p.future.done() or p.sink is None:
            return
        if ev.offset % _PAGE or ev.length % _PAGE:
            p.partial = True
            return
        if ev.buffer is None:
            p.sink([Extent(ev.offset, ev.length, 0)])
        else:
            p.sink([Extent(ev.offset, ev.length, _address(ev.buffer), ev.buffer)])
        loop = asyncio.get_running_loop()
        others = p.owner is None or p.owner is not self.peer.urgent_owner
        recent = loop.time() - self.peer.urgent_done < FAULT_LINGER
        if others and recent and not self._near_faults(p) and self._gap is None:
            self._gap = loop.call_later(BULK_GAP * ev.length / (2 << 20), self._gap_over)
            self._apply_hold()

    def _gap_over(self) -> None:
        self._gap = None
        self._apply_hold()

    @property
    def paused(self) -> bool:
        """Not reading on purpose (an urgent read awaited, or a gap)."""
        return self.held or self._gap is not None

    def _apply_hold(self) -> None:
        if self.proto is not None:
            self.proto.hold(self.paused)

    def _done(self, ev: pp.ReadDone) -> None:
        p = self.sent.pop(ev.request_id, None)
        if p is not None and not p.future.done():
            if p.sink is not None:  # streamed: its pieces are in already
                p.future.set_result(ev)
            elif self.role == "urgent":
                if p.length <= SMALL_URGENT:
                    self.peer.urgent_done = asyncio.get_running_loop().time()
                    self.peer.urgent_owner = p.owner
                self.peer.urgent_at = (p.export, p.offset)
                p.future.set_result(ev)
            else:
                self._deliveries.append((p, ev))
                self._schedule_delivery()
        self._pump()

    def hold(self, on: bool) -> None:
        """Bulk only: while any urgent read is on the wire, read no bulk bytes
        and hand out no bulk completions.

        The loop is the bottleneck a fault's reply waits for, not the wire:
        each bulk completion releases an install of up to a fill chunk, each
        bulk read moves a few hundred KiB. Held, the loop has nothing to do
        but the urgent reply when it arrives. The bulk bytes in flight wait
        in the kernel meanwhile, bounded by ``bulk_window``."""
        if on == self.held:
            return
        self.held = on
        self._apply_hold()
        self._schedule_delivery()

    def _schedule_delivery(self) -> None:
        if not self._deliveries or self.held or self._delivery_due:
            return
        self._delivery_due = True
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self.peer.urgent_done < FAULT_LINGER and not self._near_faults(self._deliveries[0][0]):
            at = max(now, self._last_delivery + BULK_GAP)
            if at > now:
                loop.call_at(at, self._deliver_one)
                return
        loop.call_soon(self._deliver_one)

    def _near_faults(self, p: _Pending) -> bool:
        export, offset = self.peer.urgent_at
        return p.export is export and abs(p.offset - offset) <= NEAR_URGENT

    def _deliver_one(self) -> None:
        """Hand out one bulk completion per loop iteration.

        Each completion wakes a task that installs up to a fill chunk (a
        millisecond or so of UFFDIO_COPY). Released all at once, several of
        them would run back to back ahead of a fault's install that became
        ready meanwhile; released one per iteration, a fault waits behind at
        most one."""
        self._delivery_due = False
        if not self._deliveries or self.held:
            return
        p, ev = self._deliveries.popleft()
        if not p.future.done():
            p.future.set_result(ev)
        self._last_delivery = asyncio.get_running_loop().time()
        self._schedule_delivery()

    def _failed(self, ev: pp.ReadFailed) -> None:
        p = self.sent.pop(ev.request_id, None)
        if p is not None and not p.future.done():
            if ev.code == pp.ErrorCode.CORRUPT and p.attempts == 0:
                p.attempts += 1
                self.log.warning("peer_data_corrupt_retrying", error=ev.message)
                self.queue.appendleft(p)
            else:
                _fail(p, f"{self.peer.label}/{p.export.name}: {ev.reason}: {ev.message}")
        self._pump()

    def _fail_all(self, message: str) -> None:
        for p in list(self.queue) + list(self.sent.values()):
            _fail(p, message)
        self.queue.clear()
        self.sent.clear()
        if self.role == "urgent":
            self.peer.prioritize()

    def fail_export(self, export: _ExportInfo) -> None:
        for p in list(self.queue) + list(self.sent.values()):
            if p.export is export:
                _fail(p, export.broken)

    # -- stall watchdog ---------------------------------------------------------------------
    def check_alive(self, suspect_since: float | None) -> None:
        """The peer's other link was lost: make sure this one still works.

        An idle connection learns of nothing by itself (a cut link or a host
        that vanished sends no reset), so the first read after the deadline
        would wait a stall timeout and a whole deadline of its own. A PING
        puts the watchdog on it; if the connection fell silent too, it is
        taken as lost from ``suspect_since``, when its sibling fell silent."""
        proto = self.proto
        if proto is None or self.closed or self.sent or proto.checking:
            return
        proto.checking = True
        proto.suspect_since = suspect_since
        proto.last_rx = asyncio.get_running_loop().time()
        proto.pinged = True
        proto.conn.ping(0)
        proto.flush()
        self._arm()

    def _expecting(self) -> bool:
        return bool(self.sent) or (self.proto is not None and self.proto.checking)

    def _arm(self) -> None:
        if self._tick is None and self._expecting() and self.proto is not None:
            period = self.peer.pool.cfg.stall_timeout / 4
            self._tick = asyncio.get_running_loop().call_later(period, self._check_stall)

    def _disarm(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def _check_stall(self) -> None:
        self._tick = None
        proto = self.proto
        if proto is None or not self._expecting():
            return
        if self.paused:  # not reading on purpose; the clock restarts when released
            self._arm()
            return
        idle = asyncio.get_running_loop().time() - proto.last_rx
        stall = self.peer.pool.cfg.stall_timeout
        if idle >= stall:
            self.log.warning("peer_stalled", idle_s=round(idle, 3), outstanding=len(self.sent))
            since = proto.suspect_since
            proto.silent_since = proto.last_rx if since is None else min(since, proto.last_rx)
            proto.abort(f"nothing received for {idle:.1f} s with {len(self.sent)} reads outstanding")
            return
        if idle >= stall / 2 and not proto.pinged:
            proto.pinged = True
            proto.conn.ping(int(idle * 1000))
            proto.flush()
        self._arm()

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._gap is not None:
            self._gap.cancel()
            self._gap = None
        if self.connector is not None:
            self.connector.cancel()
        self._fail_all(f"{self.peer.label}: source closed")
        if self.proto is not None:
            self.proto.abort("closed")
            self.proto = None


def _fail(p: _Pending, message: str) -> None:
    if not p.future.done():
        p.future.set_exception(SourceError(message))
        p.future.exception()  # nobody may be waiting any more


# -- peers and the pool ----------------------------------------------------------------------


class Peer:
    """Everything this daemon reads from one HOST:PORT."""

    def __init__(self, pool: PeerPool, host: str, port: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.label = f"peer://[{host}]:{port}" if ":" in host else f"peer://{host}:{port}"
        self.log = structlog.get_logger().bind(peer=self.label)
        self.exports: dict[str, _ExportInfo] = {}
        self._by_handle: dict[int, _ExportInfo] = {}
        #: Sent in HELLO on both links so the exporter can pair them.
        self.client_id = uuid.uuid4().hex
        #: Loop time the last small urgent read completed (see FAULT_LINGER).
        self.urgent_done = -1.0
        #: The session whose small urgent read completed last (see FAULT_LINGER).
        self.urgent_owner: object = None
        #: Export and offset of the last urgent read that completed.
        self.urgent_at: tuple[_ExportInfo | None, int] = (None, 0)
        self.urgent = _Link(self, "urgent")
        self.bulk = _Link(self, "bulk")
        self.refs = 0

    def export(self, name: str, size: int, identity: bytes) -> _ExportInfo:
        info = self.exports.get(name)
        if info is None:
            info = _ExportInfo(name, len(self.exports) + 1, size, identity)
            self.exports[name] = info
            self._by_handle[info.handle] = info
        return info

    def _opened(self, ev: pp.Opened) -> None:
        info = self._by_handle.get(ev.handle)
        if info is None or info.broken:
            return
        if ev.size != info.size or ev.identity != info.identity:
            self._broken(
                info,
                f"{self.label}/{info.name}: the export now holds a different image "
                f"({ev.size} bytes, identity {ev.identity.hex()[:16]}…); refusing to mix pages of two images",
            )

    def _open_failed(self, ev: pp.OpenFailed) -> None:
        info = self._by_handle.get(ev.handle)
        if info is not None and not info.broken:
            self._broken(info, f"{self.label}/{info.name}: the peer refused the export: {ev.reason}: {ev.message}")

    def prioritize(self) -> None:
        """Bulk waits while any urgent read is on the wire (reads queued for a
        link that is down do not count: the bulk link may still be up)."""
        self.bulk.hold(bool(self.urgent.sent) and not self.urgent.closed)

    def _broken(self, info: _ExportInfo, message: str) -> None:
        info.broken = message
        self.log.error("peer_export_broken", export=info.name, error=message)
        self.urgent.fail_export(info)
        self.bulk.fail_export(info)

    def close(self) -> None:
        self.urgent.close()
        self.bulk.close()


class PeerPool:
    """The daemon's remote sources, one :class:`Peer` per address, shared."""

    def __init__(self, cfg: RemoteConfig | None = None) -> None:
        self.cfg = cfg or RemoteConfig()
        self.ssl = client_context(self.cfg)
        self.buffers = _BufferPool()
        self.peers: dict[tuple[str, int], Peer] = {}
        self._sources: dict[str, tuple[RemoteSource, int]] = {}

    @staticmethod
    def handles(name: str) -> bool:
        return name.startswith("peer://")

    def _resolve(self, url: str) -> tuple[Peer, str]:
        try:
            host, port, name = parse_peer_url(url)
        except AddressError as e:
            raise SourceError(str(e)) from None
        if self.ssl is None and not plaintext_allowed(self.cfg, host):
            raise PeerUnavailable(
                f"{url}: {host} is not a loopback address: configure [remote] tls_ca (and tls_cert, tls_key) "
                "or set [remote] insecure = true"
            )
        peer = self.peers.get((host, port))
        if peer is None:
            peer = self.peers[(host, port)] = Peer(self, host, port)
        return peer, name

    def acquire(self, url: str) -> RemoteSource:
        """The source for ``url``. The first use of an export asks the peer for
        its size (a short blocking exchange, bounded by ``connect_timeout``);
        :meth:`acquire_async` does the same without blocking the loop."""
        held = self._hold(url)
        if held is not None:
            return held
        peer, name = self._resolve(url)
        if name not in peer.exports:
            size, identity = probe(peer.host, peer.port, name, self.cfg, self.ssl)
            peer.export(name, size, identity)
        return self._make(url, peer, name)

    async def acquire_async(self, url: str) -> RemoteSource:
        held = self._hold(url)
        if held is not None:
            return held
        peer, name = self._resolve(url)
        if name not in peer.exports:
            size, identity = await self._first_contact(peer, name)
            peer.export(name, size, identity)
        held = self._hold(url)  # another acquire may have finished meanwhile
        return held if held is not None else self._make(url, peer, name)

    async def _first_contact(self, peer: Peer, name: str) -> tuple[int, bytes]:
        """:func:`probe`, retried while the peer does not answer, up to
        ``reconnect_deadline``: a link down at handoff time is ridden out
        like one that drops a moment later."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        start = loop.time()
        due = start + cfg.reconnect_deadline
        delay = _BACKOFF_START
        attempts = 0
        while True:
            attempts += 1
            timeout = max(0.05, min(cfg.connect_timeout, due - loop.time()))
            try:
                return await asyncio.to_thread(probe, peer.host, peer.port, name, cfg, self.ssl, timeout)
            except _NoAnswer as e:
                error = e.reason
            now = loop.time()
            waited = now - start
            if now >= due:
                peer.log.error(
                    "peer_unreachable", export=name, waited_s=round(waited, 3), attempts=attempts, error=error
                )
                raise PeerUnavailable(
                    f"{peer.label}/{name}: no connection for {waited:.1f} s (deadline {cfg.reconnect_deadline} s); "
                    f"last error: {error}"
                )
            log = peer.log.warning if attempts == 1 else peer.log.debug
            log("peer_first_contact_retrying", export=name, attempts=attempts, error=error)
            await asyncio.sleep(min(delay, due - now))
            delay = min(delay * 2, cfg.backoff_max)

    def _hold(self, url: str) -> RemoteSource | None:
        if url in self._sources:
            src, refs = self._sources[url]
            self._sources[url] = (src, refs + 1)
            return src
        return None

    def _make(self, url: str, peer: Peer, name: str) -> RemoteSource:
        src = RemoteSource(peer, peer.exports[name], url)
        self._sources[url] = (src, 1)
        peer.refs += 1
        with contextlib.suppress(RuntimeError):  # no running loop: connect on first read
            asyncio.get_running_loop()
            peer.urgent.warm()
            peer.bulk.warm()
        return src

    def release(self, src: RemoteSource) -> bool:
        """Drop one reference; False if ``src`` is not one of ours."""
        entry = self._sources.get(src.name)
        if entry is None or entry[0] is not src:
            return False
        refs = entry[1] - 1
        if refs > 0:
            self._sources[src.name] = (src, refs)
            return True
        del self._sources[src.name]
        peer = src.peer
        peer.refs -= 1
        if peer.refs <= 0:
            peer.close()
            self.peers.pop((peer.host, peer.port), None)
        return True

    @property
    def open_sources(self) -> list[RemoteSource]:
        return [s for s, _ in self._sources.values()]

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        self._sources.clear()
        self.buffers.clear()


class RemoteSource(PageSource):
    """An export of a peer, read over the peer's shared links."""

    synchronous = False

    def __init__(self, peer: Peer, export: _ExportInfo, url: str) -> None:
        self.peer = peer
        self.export = export
        self.name = url
        self.size = export.size

    def extents(self, offset: int, length: int) -> list[Extent]:
        raise SourceError(f"{self.name}: a remote source can only be read asynchronously")

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        return await self._get(self.peer.bulk, offset, length)

    async def fetch_urgent(self, offset: int, length: int, owner: object = None) -> list[Extent]:
        return await self._get(self.peer.urgent, offset, length, owner)

    async def fetch_into(
        self, offset: int, length: int, sink: Callable[[list[Extent]], None], owner: object = None
    ) -> bool:
        """Stream a bulk read: each frame goes to ``sink`` as soon as it is
        verified, from one reused buffer, so it is copied in while still in
        the CPU's cache (the reader's CPU, not the wire, bounds the fill on
        a fast link). False if a piece could not be handed over (it did not
        cover whole pages): the caller reads what is still missing plainly."""
        self.check_range(offset, length)
        whole = True
        for o in range(offset, offset + length, READ_PIECE):
            p = await self.peer.bulk.read(self.export, o, min(READ_PIECE, offset + length - o), sink, owner)
            whole = whole and not p.partial
        return whole

    async def _get(self, link: _Link, offset: int, length: int, owner: object = None) -> list[Extent]:
        self.check_range(offset, length)
        if length == 0:
            return []
        if length <= READ_PIECE:
            return _extents((await link.read(self.export, offset, length, owner=owner)).future.result())
        parts = await asyncio.gather(
            *(
                link.read(self.export, o, min(READ_PIECE, offset + length - o), owner=owner)
                for o in range(offset, offset + length, READ_PIECE)
            )
        )
        out: list[Extent] = []
        for p in parts:
            out += _extents(p.future.result())
        return out

    def close(self) -> None:
        """Closing is the pool's business (sources are shared); see PeerPool.release."""


_PAGE = 4096


def _extents(done: pp.ReadDone) -> list[Extent]:
    """Extents over a completed read. Runs that do not start and end on page
    boundaries cannot be installed as they are: then the zeros are written
    into the buffer and the whole read becomes one data extent."""
    runs = done.runs
    if any(r.offset % _PAGE or r.length % _PAGE for r in runs) and any(r.zero for r in runs):
        buf = done.buffer
        if buf is None:
            return [Extent(done.offset, done.length, 0)]
        for r in runs:
            if r.zero:
                buf.view[r.offset : r.offset + r.length] = bytes(r.length)
        return [Extent(done.offset, done.length, _address(buf), buf)]
    out: list[Extent] = []
    for r in runs:
        if r.zero:
            out.append(Extent(done.offset + r.offset, r.length, 0))
        else:
            assert done.buffer is not None
            out.append(Extent(done.offset + r.offset, r.length, _address(done.buffer) + r.offset, done.buffer))
    return out


def _address(buf: object) -> int:
    addr = getattr(buf, "address", None)
    if not isinstance(addr, int):
        raise SourceError("receive buffer without an address")
    return addr


# -- the blocking first contact ----------------------------------------------------------------


def probe(
    host: str, port: int, name: str, cfg: RemoteConfig, ctx: ssl.SSLContext | None, timeout: float | None = None
) -> tuple[int, bytes]:
    """Ask the peer for export ``name``'s size and identity (blocking, bounded
    by ``timeout``, by default ``cfg.connect_timeout``). The same protocol core
    as the links, over a plain blocking socket. A peer that could not be
    reached or did not answer raises a PeerUnavailable that may be retried
    (see PeerPool._first_contact); other refusals are final."""
    label = f"peer://{host}:{port}/{name}"
    timeout = cfg.connect_timeout if timeout is None else timeout
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise _NoAnswer(f"{label}: cannot connect: {_describe(e)}", _describe(e)) from None
    sock: socket.socket = raw
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(raw, server_hostname=cfg.server_name or host)
            except ssl.SSLError as e:
                raise PeerUnavailable(f"{label}: TLS handshake failed: {_describe(e)}") from None
        sock.settimeout(timeout)
        conn = pp.ClientConnection("bulk", encodings=())
        try:
            return _probe_exchange(sock, conn, name, label, tls=ctx is not None)
        except ssl.SSLError as e:
            raise PeerUnavailable(f"{label}: the peer refused the TLS session: {_describe(e)}") from None
        except TimeoutError:
            raise _NoAnswer(f"{label}: no answer within {timeout:g} s", f"no answer within {timeout:g} s") from None
        except OSError as e:
            if ctx is not None:
                # TLS 1.3 checks our certificate after the handshake: a
                # refusal can arrive as a reset instead of an alert.
                raise PeerUnavailable(
                    f"{label}: the TLS session was reset before the peer answered ({_describe(e)}): "
                    "it refused our client certificate? (compare [remote] tls_cert with the exporter's tls_ca)"
                ) from None
            raise PeerUnavailable(f"{label}: {_describe(e)}") from None
        except pp.RemoteProtocolError as e:
            raise PeerUnavailable(f"{label}: protocol error: {e}") from None
    finally:
        sock.close()
        raw.close()


def _probe_exchange(
    sock: socket.socket, conn: pp.ClientConnection, name: str, label: str, *, tls: bool
) -> tuple[int, bytes]:
    for chunk in conn.data_to_send():
        sock.sendall(chunk)
    heard = False
    while True:
        ev = conn.next_event()
        if ev is pp.NEED_DATA:
            data = sock.recv(65536)
            if not data and not heard:
                why = (
                    "the peer ended the TLS session before answering: it refused our client certificate? "
                    "(compare [remote] tls_cert with the exporter's tls_ca)"
                    if tls
                    else "the peer closed the connection without answering"
                )
                raise PeerUnavailable(f"{label}: {why}")
            heard = True
            conn.receive_data(data)
            continue
        if ev is pp.CLOSED:
            raise PeerUnavailable(f"{label}: the peer closed the connection during the handshake")
        if isinstance(ev, pp.Welcome):
            conn.open(1, name)
        elif isinstance(ev, pp.PeerError):
            why = f"the peer refused: {ev.reason}: {ev.message}"
            if ev.code in (pp.ErrorCode.BUSY, pp.ErrorCode.SHUTTING_DOWN):
                raise _NoAnswer(f"{label}: {why}", why)
            raise PeerUnavailable(f"{label}: {why}")
        elif isinstance(ev, pp.OpenFailed):
            raise SourceError(f"{label}: the peer refused the export: {ev.reason}: {ev.message}")
        elif isinstance(ev, pp.Opened):
            return ev.size, ev.identity
        for chunk in conn.data_to_send():
            sock.sendall(chunk)


__all__ = ["PeerPool", "PeerUnavailable", "RemoteSource", "probe"]
