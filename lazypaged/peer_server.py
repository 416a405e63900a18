"""Exporting snapshots to other lazypaged daemons over TCP (``[export]``).

The asyncio layer around ``peer_protocol.ServerConnection``: it accepts,
sets up TLS, moves bytes, and turns reads into DATA frames from the
exported sources. Rules of this file:

* Only the snapshots named in ``[export] snapshots`` are served, opened
  through the daemon's registry (so the same name rules apply) when the
  listener starts. Every read is checked against its export's size by the
  protocol core before it reaches a source; sources check again.
* A connection that breaks the protocol gets one ERROR frame with the reason
  and is closed; nothing it sends can affect other connections.
* Reads are answered in the order they arrived on their connection, with
  the next reads' sources already working (pipelined). Urgent and bulk
  reads travel on different connections, so an urgent read never queues
  behind bulk data, in our buffers or the kernel's.
* A mapped source's memory is only read while the source is pinned
  (``PageSource.pinned``: its file cannot be cut meanwhile), and never
  outside it: the bytes are copied out under the pin, checksummed,
  compressed and handed to the transport from the copy. A local source's
  bulk read is therefore read window by window at its turn to be sent,
  not when it arrives; a cut file fails the read with an ERROR frame, and
  the exporter (a SIGBUS would end it and every restore it serves) goes
  on. Extents whose memory the source owns (``owner`` set) are copied too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import socket
import ssl
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import structlog
import zstandard

from . import peer_protocol as pp
from .access import certificate_identities
from .config import Config, ExportConfig
from .peer_tls import server_context, split_host_port
from .snapshot.format import checksum
from .sources.base import Extent, PageSource, SourceError
from .sources.registry import SourceRegistry

#: Write buffer marks per connection: a few DATA frames queued while the
#: kernel drains the socket, and no more.
WRITE_HIGH = 2 * pp.BULK_FRAME
WRITE_LOW = pp.BULK_FRAME // 2
#: Seconds a new connection has to say who it is (preamble, TLS handshake).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a refused plaintext connection is kept for its client to read the ERROR and hang up.
REFUSE_LINGER = 2.0
#: TCP keepalive for exporter sockets: a reader that vanished is noticed.
_KEEPALIVE = (30, 10, 3)  # idle s, interval s, probes


class _Reader:
    """One reading daemon's connections (HELLO ``client``): strict priority.

    While any urgent read of a reader is being answered, its bulk
    connection sends nothing: a bulk frame already started finishes, the
    next waits. Together with the reader's small bulk receive window this
    keeps an urgent reply from queueing behind bulk data anywhere."""

    def __init__(self) -> None:
        self.urgent_busy = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.conns = 0

    def begin(self) -> None:
        self.urgent_busy += 1
        self.idle.clear()

    def end(self) -> None:
        self.urgent_busy -= 1
        if self.urgent_busy <= 0:
            self.urgent_busy = 0
            self.idle.set()


@dataclass
class Export:
    name: str
    source: PageSource
    identity: bytes


def identity_of(source: PageSource) -> bytes:
    """16 bytes that change when the image does (content for snapshots, file
    identity and modification time for raw images)."""
    reader = getattr(source, "reader", None)
    if reader is not None:
        sums = b"".join(c.checksum for c in reader.index.chunks)
        return checksum(b"snapshot" + struct.pack("<Q", source.size) + sums)
    path = getattr(source, "path", None)
    if isinstance(path, str):
        st = os.stat(path)
        return checksum(b"raw" + struct.pack("<QQQQ", source.size, st.st_dev, st.st_ino, st.st_mtime_ns))
    return checksum(b"source" + struct.pack("<Q", source.size) + source.name.encode())


class ExportServer:
    """The ``[export]`` listener (one of ``Daemon.listeners``)."""

    def __init__(self, cfg: ExportConfig, registry: SourceRegistry, allowed: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        #: Certificate identities that may read (``[access] peer_identities``); empty: any the CA signed.
        self.allowed = frozenset(allowed)
        self.registry = registry
        self.host, self.port = split_host_port(cfg.listen, any_port=True)
        self.log = structlog.get_logger().bind(listener="export")
        self.exports: dict[str, Export] = {}
        self._tls = server_context(cfg)
        self._sock: socket.socket | None = None
        self._conns: set[_ExportProtocol] = set()
        self._readers: dict[str, _Reader] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: set[asyncio.Task[None]] = set()
        #: Exports withdrawn by a reload, released once no connection can send their bytes.
        self._retiring: set[asyncio.Task[None]] = set()
        #: close_connections began: a connection set up now is told so and closed.
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        for p in self.cfg.snapshots:
            name = str(p)
            src = self.registry.acquire(name)
            try:
                self.exports[name] = Export(name, src, identity_of(src))
            except BaseException:
                self.registry.release(src)
                raise
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"export listener on {self.cfg.listen}: {e.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        self.log.info(
            "export_listening",
            address=self.cfg.listen,
            tls=self._tls is not None,
            exports={n: e.source.size for n, e in self.exports.items()},
        )

    def reload(self, cfg: Config) -> None:
        """Serve ``cfg``'s exports and peer identity rules from now on.

        All or nothing: a snapshot that cannot be opened raises (the registry's
        error) and nothing changes. Connections with a withdrawn export open,
        or whose certificate is no longer allowed, are closed: their readers
        reconnect and are told ``unknown_export`` or ``auth`` like any new
        reader, so no reader keeps what the new rules deny. The listen address
        and TLS material need a restart; changes to them are logged and left.
        """
        new, old = cfg.export, self.cfg
        names = list(dict.fromkeys(str(p) for p in new.snapshots))
        added: dict[str, Export] = {}
        try:
            for name in names:
                if name not in self.exports:
                    src = self.registry.acquire(name)
                    try:
                        added[name] = Export(name, src, identity_of(src))
                    except BaseException:
                        self.registry.release(src)
                        raise
        except BaseException:
            for e in added.values():
                self.registry.release(e.source)
            raise
        withdrawn = [e for n, e in self.exports.items() if n not in names]
        for e in withdrawn:
            del self.exports[e.name]
        self.exports.update(added)
        self.allowed = frozenset(cfg.access.peer_identities)
        self.cfg = dataclasses.replace(old, snapshots=new.snapshots)
        gone = {id(e) for e in withdrawn}
        closing: list[_ExportProtocol] = []
        for c in list(self._conns):
            if not self._may_read(c.identities):
                c.refuse_auth()
                closing.append(c)
            elif any(id(e) in gone for e in c.exports_open()):
                c.abort()
                closing.append(c)
        if withdrawn:
            task = asyncio.get_running_loop().create_task(self._retire(withdrawn, closing))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        fixed = ("listen", "tls_cert", "tls_key", "tls_ca", "insecure")
        restart = [k for k in fixed if getattr(new, k) != getattr(old, k)]
        self.log.info(
            "export_reloaded",
            added=sorted(added),
            withdrawn=sorted(e.name for e in withdrawn),
            peer_identities=sorted(self.allowed),
            connections_closed=len(closing),
            needs_restart=restart,
        )
        if restart:
            self.log.warning("export_reload_needs_restart", settings=restart)

    async def _retire(self, exports: list[Export], closing: list[_ExportProtocol]) -> None:
        try:
            await asyncio.gather(*(c.gone.wait() for c in closing))
            # Let aborted transports finish closing before their sources go.
            await asyncio.sleep(0)
        finally:
            for e in exports:
                self.registry.release(e.source)

    def _may_read(self, identities: frozenset[str]) -> bool:
        return not self.allowed or bool(identities & self.allowed)

    def stop_accepting(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    async def close_connections(self) -> None:
        self._closing = True
        for t in list(self._tasks) + list(self._refusals):
            t.cancel()
        for c in list(self._conns):
            c.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        # Let aborted transports finish closing before their sources go.
        await asyncio.sleep(0)
        for e in self.exports.values():
            self.registry.release(e.source)
        self.exports.clear()

    # -- accepting ---------------------------------------------------------------------
    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                self.log.error("export_accept_failed", error=e.strerror)
                return
            if len(self._conns) + len(self._tasks) >= self.cfg.max_connections:
                busy = f"the exporter already serves {self.cfg.max_connections} connections"
                refusal = asyncio.get_running_loop().create_task(_refuse_plain(conn, pp.ErrorCode.BUSY, busy))
                self._refusals.add(refusal)
                refusal.add_done_callback(self._refusals.discard)
                self.log.warning("peer_refused", peer=_fmt(addr), code="busy")
                continue
            task = asyncio.get_running_loop().create_task(self._setup(conn, _fmt(addr)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _setup(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        _tune(conn)
        log = self.log.bind(peer=peer)
        try:
            first = await asyncio.wait_for(_peek(loop, conn, len(pp.PREAMBLE)), HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError):
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()  # at once: the reader sees the close, not silence until this is collected
            raise
        plaintext = first.startswith(pp.PREAMBLE[: len(first)]) and bool(first)
        if self._tls is not None and plaintext:
            log.warning("peer_refused", code="auth", reason="plaintext connection to a TLS listener")
            await _refuse_plain(conn, pp.ErrorCode.AUTH, "this exporter requires TLS with a client certificate")
            return
        proto = _ExportProtocol(self, log)
        try:
            if self._tls is not None:
                await loop.connect_accepted_socket(
                    lambda: proto, conn, ssl=self._tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
                )
            else:
                await loop.connect_accepted_socket(lambda: proto, conn)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            log.warning("peer_refused", code="auth", reason=f"TLS handshake failed: {e}")
            conn.close()
            return

    def _export(self, name: str) -> Export | None:
        return self.exports.get(name)

    def _reader(self, client: str) -> _Reader:
        r = self._readers.get(client)
        if r is None:
            r = self._readers[client] = _Reader()
        r.conns += 1
        return r

    def _reader_gone(self, client: str, r: _Reader) -> None:
        r.conns -= 1
        if r.conns <= 0 and self._readers.get(client) is r:
            del self._readers[client]


def _fmt(addr: Any) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _tune(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE[0])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE[1])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE[2])


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    """The first bytes the client sent, left in the socket (b"" on EOF)."""
    while True:
        try:
            return conn.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())


async def _refuse_plain(conn: socket.socket, code: pp.ErrorCode, message: str) -> None:
    """Answer with a plaintext ERROR and close (best effort).

    Closed at once, a socket holding the client's unread HELLO sends a reset,
    which can destroy the ERROR before the client reads it (it then sees
    "connection reset" instead of the reason): so the ERROR is followed by
    our FIN, and the socket closed once the client hung up too, or after
    ``REFUSE_LINGER`` seconds."""
    loop = asyncio.get_running_loop()
    try:
        conn.setblocking(False)
        conn.send(pp.PREAMBLE + pp.encode_error(0, code, message))
        conn.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(_drain(loop, conn), REFUSE_LINGER)
    except (OSError, TimeoutError):
        pass
    finally:
        conn.close()


async def _drain(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Read and drop what the client sends until it closes."""
    while await loop.sock_recv(conn, 65536):
        pass


class _ExportProtocol(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: ExportServer, log: Any) -> None:
        self.server = server
        self.log = log
        self.conn = pp.ServerConnection(max_inflight=server.cfg.max_inflight)
        self.transport: asyncio.Transport | None = None
        self.urgent = False
        #: Reads to answer in order; a local source's bulk read has no task:
        #: it is read when its turn comes (see _send_local).
        self._queue: deque[tuple[pp.Read, Export, asyncio.Task[list[Extent]] | None]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._handles: dict[int, Export] = {}
        self._closing = False
        self.bytes_sent = 0
        self._client = ""
        self._reader: _Reader = _Reader()
        #: The client certificate's identities (subject CN, subjectAltName values).
        self.identities: frozenset[str] = frozenset()
        self.gone = asyncio.Event()

    # -- transport callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but quacks like one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if self.server._closing:
            # Its setup outlived close_connections: without this it would be
            # served by an exporter whose exports are gone, and its reader
            # told that its export is unknown (for good) instead of "come back".
            self.conn.fatal(pp.ErrorCode.SHUTTING_DOWN, "the exporter is stopping")
            self._flush()
            self.transport.close()
            return
        self.server._conns.add(self)
        cert = transport.get_extra_info("peercert")
        if cert:
            self.log = self.log.bind(client=_subject(cert))
        self.identities = frozenset(certificate_identities(cert or {}))
        if not self.server._may_read(self.identities):
            self.refuse_auth()
            return
        self._flush()

    def refuse_auth(self) -> None:
        """Send ERROR ``auth`` and close: this certificate may not read (any more)."""
        who = sorted(self.identities) or "no certificate"
        reason = f"certificate identity {who} not in access.peer_identities"
        self.log.warning("peer_refused", code="auth", reason=reason)
        self.conn.fatal(pp.ErrorCode.AUTH, "this certificate may not read these exports")
        self._closing = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def exports_open(self) -> list[Export]:
        return list(self._handles.values())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        if self._client:
            self.server._reader_gone(self._client, self._reader)
            self._client = ""
        if self.urgent:
            while self._queue:  # bulk replies of this reader must not wait for these
                task = self._queue.popleft()[2]
                if task is not None:
                    task.cancel()
                self._reader.end()
        self._closing = True
        for _, _, pending in self._queue:
            if pending is not None:
                pending.cancel()
        if self._writer is not None:
            self._writer.cancel()
        self._can_write.set()
        self.gone.set()
        self.log.info("peer_disconnected", reads_left=len(self._queue), error=str(exc) if exc else None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- protocol events ------------------------------------------------------------------
    def _process(self) -> None:
        if self._closing:
            return
        try:
            while True:
                ev = self.conn.next_event()
                if ev is pp.NEED_DATA:
                    break
                if ev is pp.CLOSED:
                    self._close()
                    break
                self._handle(ev)
        except pp.RemoteProtocolError as e:
            self.log.warning("peer_protocol_error", code=pp.ErrorCode.name_of(e.code), error=str(e))
            self.conn.fatal(e.code, str(e))
            self._close()
        self._flush()

    def _handle(self, ev: object) -> None:
        if isinstance(ev, pp.Hello):
            self.urgent = ev.role == "urgent"
            if ev.client:
                self._client = ev.client
                self._reader = self.server._reader(ev.client)
            self.log = self.log.bind(role=ev.role)
            self.log.info(
                "peer_connected", agent=ev.agent, version=self.conn.version, encodings=list(self.conn.encodings)
            )
        elif isinstance(ev, pp.Open):
            export = self.server._export(ev.name)
            if export is None:
                self.conn.refuse_open(ev.handle, pp.ErrorCode.UNKNOWN_EXPORT, f"no export named {ev.name!r} here")
                self.log.warning("peer_refused", code="unknown_export", export=ev.name)
            else:
                self._handles[ev.handle] = export
                self.conn.opened(ev.handle, export.source.size, export.identity)
        elif isinstance(ev, pp.Read):
            export = self._handles[ev.handle]
            if self.urgent and export.source.synchronous:
                self._answer_now(export, ev)
                return
            local = export.source.synchronous and not self.urgent
            task = None if local else asyncio.get_running_loop().create_task(self._fetch(export, ev))
            self._queue.append((ev, export, task))
            if self.urgent:
                self._reader.begin()
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._write_replies())
        elif isinstance(ev, pp.ReadRefused):
            self.log.info(
                "peer_read_refused", request=ev.request_id, code=pp.ErrorCode.name_of(ev.code), error=ev.message
            )

    def _answer_now(self, export: Export, read: pp.Read) -> None:
        """An urgent read of a local source, answered while its READ is parsed.

        A faulting thread on the reader waits for this: going through a task
        and the writer would cost two more loop iterations, each possibly
        behind a bulk frame being written."""
        src = export.source
        try:
            with src.pinned():  # held until every byte is copied out of the mapping
                self._send(read, src.extents(read.offset, read.length))
        except SourceError as e:
            self._failed(read, e)
        except pp.LocalProtocolError as e:
            self._internal(read, f"the source answered outside the read: {e}")
        except Exception as e:  # a bug: refuse this read, keep the connection
            self.log.error("export_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
            self._internal(read, f"{type(e).__name__}: {e}")

    def _failed(self, read: pp.Read, e: SourceError) -> None:
        if self.conn.remaining(read.request_id):
            self.conn.fail_read(read.request_id, pp.ErrorCode.SOURCE_ERROR, str(e))
        self.log.warning("peer_read_failed", request=read.request_id, error=str(e))

    async def _fetch(self, export: Export, read: pp.Read) -> list[Extent]:
        """A read of a source that must wait. Memory of the source's own
        (``owner`` set) stays valid by itself; bytes it only lends (a
        mapping) are copied before the pin ends."""
        src = export.source
        with src.pinned():
            if self.urgent:
                extents = await src.fetch_urgent(read.offset, read.length)
            else:
                extents = await src.fetch(read.offset, read.length)
            return [_own(e) if e.address and e.owner is None else e for e in extents]

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    # -- replies --------------------------------------------------------------------------
    async def _write_replies(self) -> None:
        try:
            while self._queue and not self._closing:
                read, export, task = self._queue[0]
                try:
                    if task is None:
                        await self._send_local(read, export.source)
                    elif self.urgent:
                        self._send(read, await task)
                    else:
                        await self._send_bulk(read, await task)
                except SourceError as e:
                    self._failed(read, e)
                except pp.LocalProtocolError as e:
                    self._internal(read, f"the source answered outside the read: {e}")
                except Exception as e:  # a bug: refuse this read, keep the connection
                    self.log.error("export_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
                    self._internal(read, f"{type(e).__name__}: {e}")
                self._queue.popleft()
                if self.urgent:
                    self._reader.end()
                self._flush()
                await self._can_write.wait()
        finally:
            self._writer = None

    def _internal(self, read: pp.Read, message: str) -> None:
        if self.conn.remaining(read.request_id):
            self.conn.fail_read(read.request_id, pp.ErrorCode.INTERNAL, message)

    def _send(self, read: pp.Read, extents: list[Extent]) -> None:
        """Synchronous, so a caller that pinned the source keeps it pinned
        until every byte was copied (``_bytes_at``)."""
        _check_cover(read.offset, read.length, extents)
        rid = read.request_id
        for e in extents:
            if e.address == 0:
                self.conn.send_zero(rid, e.length)
            else:
                self.conn.send_data(rid, _bytes_at(e))
                self.bytes_sent += e.length

    async def _send_bulk(self, read: pp.Read, extents: list[Extent]) -> None:
        """Frame by frame, yielding to this reader's urgent replies and to
        the transport's flow control between frames; compressed if agreed."""
        _check_cover(read.offset, read.length, extents)
        level = self.server.cfg.compress_level if "zstd" in self.conn.encodings else 0
        rid = read.request_id
        for e in extents:
            if e.address == 0:
                self.conn.send_zero(rid, e.length)
                continue
            view = memoryview(_bytes_at(e))
            for pos in range(0, e.length, pp.BULK_FRAME):
                if not await self._bulk_turn():
                    return
                if not await self._send_frame(rid, view[pos : pos + pp.BULK_FRAME], level):
                    return
            self.bytes_sent += e.length

    async def _send_local(self, read: pp.Read, src: PageSource) -> None:
        """A bulk read of a local source, read a window at a time when it is
        sent. Each window is read and copied under the source's pin within
        one callback, so no address into a mapping outlives an await (the
        file may be cut then) and the copy is what is checksummed,
        compressed and written. Zero runs still travel as one ZERO frame."""
        level = self.server.cfg.compress_level if "zstd" in self.conn.encodings else 0
        rid = read.request_id
        pos, end = read.offset, read.offset + read.length
        zeros = 0
        while pos < end:
            n = min(pp.BULK_FRAME, end - pos)
            if not await self._bulk_turn():
                return
            with src.pinned():
                extents = src.extents(pos, n)
                _check_cover(pos, n, extents)
                pieces = [(e.length, _bytes_at(e) if e.address else None) for e in extents]
            for length, data in pieces:
                if data is None:
                    zeros += length
                    continue
                if zeros:
                    self.conn.send_zero(rid, zeros)
                    zeros = 0
                if not await self._send_frame(rid, data, level):
                    return
                self.bytes_sent += length
            pos += n
        if zeros:
            self.conn.send_zero(rid, zeros)

    async def _bulk_turn(self) -> bool:
        """Wait until a bulk frame may go (no urgent reply of this reader
        under way, room in the transport); False if the connection closed."""
        if not self._reader.idle.is_set() or not self._can_write.is_set():
            self._flush()
            await self._reader.idle.wait()
            await self._can_write.wait()
        return not self._closing

    async def _send_frame(self, rid: int, piece: bytes | memoryview, level: int) -> bool:
        """One bulk frame of bytes nobody else may change or unmap; False if
        the connection closed meanwhile."""
        if level:
            loop = asyncio.get_running_loop()
            frame, digest = await loop.run_in_executor(None, _compress, level, piece)
            if len(frame) < len(piece):
                self.conn.send_compressed(rid, len(piece), frame, digest)
            else:
                self.conn.send_data(rid, piece, frame=pp.BULK_FRAME)
        else:
            self.conn.send_data(rid, piece, frame=pp.BULK_FRAME)
        self._flush()
        # One frame per loop iteration: an urgent READ that arrived
        # meanwhile is read (and answered) before the next frame.
        await asyncio.sleep(0)
        return not self._closing


_local = threading.local()


def _compress(level: int, piece: bytes | memoryview) -> tuple[bytes, bytes]:
    """Runs in the default executor: one compressor per thread (they are not thread-safe)."""
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level)
        _local.level = level
    return cctx.compress(piece), checksum(piece)


def _check_cover(offset: int, length: int, extents: list[Extent]) -> None:
    pos = offset
    for e in extents:
        if e.offset != pos or e.length <= 0:
            raise pp.LocalProtocolError(f"extent at {e.offset:#x} where {pos:#x} was expected")
        pos += e.length
    if pos != offset + length:
        raise pp.LocalProtocolError(f"extents end at {pos:#x}, the read at {offset + length:#x}")


class _Copy(bytes):
    """Bytes copied out of a source under its pin: the exporter's own, sent as they are."""


def _own(e: Extent) -> Extent:
    """``e`` with its bytes copied into memory of the exporter's own."""
    data = _Copy((ctypes.c_char * e.length).from_address(e.address))
    return Extent(e.offset, e.length, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 1, data)


def _bytes_at(e: Extent) -> bytes | memoryview:
    """The extent's bytes, as bytes nothing can change or unmap under the
    transport: copied now (the caller holds the source's pin, or the owner
    keeps the memory alive), or our own copy referenced."""
    if isinstance(e.owner, _Copy):
        return memoryview(e.owner)
    return ctypes.string_at(e.address, e.length)


def _subject(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        return f"{kind}:{value}"
    return "?"
