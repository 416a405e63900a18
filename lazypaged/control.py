"""The control socket: ``lazypaged status`` asks the running daemon.

The asyncio layer around ``control_protocol``: it moves lines, nothing
else. The server keeps answering while the daemon drains its sessions on
shutdown (that is when an operator most wants to see them) and closes with
the last listeners. ``ControlClient`` is the blocking client the CLI uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from . import __version__
from . import control_protocol as cp
from .monitor import Monitor
from .sessions import SessionTable
from .sources import PageSource
from .unixsock import listen_unix

#: Clients connected at once. Each costs a descriptor and a task; status
#: is for people and scripts, a few at a time. A new client takes the slot
#: of one that never asked anything (the oldest), else of the one idle
#: longest; only when every client is being answered does it get ``busy``.
MAX_CLIENTS = 16
#: Seconds a client may stay connected without asking anything
#: (``status --watch`` asks every few seconds).
IDLE_TIMEOUT = 300.0
#: Seconds a new connection has for its first request: ``lazypaged status``
#: asks at once, a silent connection only holds a slot.
FIRST_REQUEST_TIMEOUT = 5.0
_READ = 65536


def build_status(sessions: SessionTable, monitor: Monitor) -> cp.StatusReply:
    """What the daemon is doing now, from counters the sessions keep anyway."""
    out: list[cp.SessionStatus] = []
    users: dict[str, tuple[PageSource, int]] = {}
    for s in sessions:
        st = s.stats
        rates = monitor.rates(s.id)
        names = tuple(sorted({r.source.name for r in s.regions}))
        out.append(
            cp.SessionStatus(
                id=s.id,
                kind=s.kind,
                pid=s.pid,
                state=s.state,
                sources=names,
                pages_total=st.pages_total,
                pages_installed=max(0, st.pages_total - st.pages_missing),
                faults=st.faults,
                bytes_copied=st.bytes_copied,
                bytes_zero=st.bytes_zero,
                bytes_fault=st.bytes_fault,
                bytes_fill=st.bytes_fill,
                fault_p50_us=st.percentile_us(0.5),
                fault_p99_us=st.percentile_us(0.99),
                fill_rate=max(0.0, rates.fill),
                install_rate=max(0.0, rates.install),
                seconds=max(0.0, st.seconds),
                source_errors=st.source_errors,
                bytes_poisoned=st.bytes_poisoned,
            )
        )
        for src in {id(r.source): r.source for r in s.regions}.values():
            n = users[src.name][1] + 1 if src.name in users else 1
            users[src.name] = (src, n)
    daemon = cp.DaemonStatus(
        version=__version__,
        pid=os.getpid(),
        state="stopping" if monitor.stopping else "running",
        uptime_s=max(0.0, time.monotonic() - monitor.started),
        sessions_finished=sessions.finished,
        install_rate=max(0.0, monitor.total_install_rate()),
    )
    sources = tuple(
        cp.SourceStatus(name, _source_type(src), src.size, n, _link_count(src, "bytes_in_flight"),
                        _link_count(src, "reconnects"))
        for name, (src, n) in sorted(users.items())
    )
    return cp.StatusReply(daemon, tuple(out), sources)


def _link_count(src: PageSource, attr: str) -> int | None:
    """A counter a networked source exposes (``bytes_in_flight``, ``reconnects``)."""
    v = getattr(src, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _source_type(src: object) -> str:
    """RawImageSource → "raw image"."""
    name = type(src).__name__.removesuffix("Source") or "source"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


class ControlServer:
    def __init__(self, path: Path, mode: int, status: Callable[[], cp.StatusReply]) -> None:
        self.path = path
        self.mode = mode
        self._status = status
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        #: Clients waiting for their next request: (has asked before, since when).
        self._waiting: dict[asyncio.Task[None], tuple[bool, float]] = {}
        self.log = structlog.get_logger().bind(listener="control")

    async def start(self) -> None:
        sock = listen_unix(self.path, self.mode)
        self._server = await asyncio.start_unix_server(self._accepted, sock=sock)
        self.log.info("listening", path=str(self.path))

    def stop_accepting(self) -> None:
        """Nothing: status keeps answering while sessions drain."""

    async def close_connections(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for t in list(self._clients):
            t.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if len(self._clients) > MAX_CLIENTS and not self._evict():
                self.log.warning("control_client_refused", reason="every client is being answered")
                writer.write(cp.encode(cp.ErrorReply("busy", f"more than {MAX_CLIENTS} status clients connected")))
            else:
                await self._serve(reader, writer)
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        except Exception as e:  # a bug: log it, keep serving the others
            self.log.error("control_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
        finally:
            self._waiting.pop(task, None)
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _evict(self) -> bool:
        """Make room: drop the oldest client that never asked, else the one idle longest."""
        if not self._waiting:
            return False
        victim = min(self._waiting, key=lambda t: self._waiting[t])  # never asked (False) sorts first
        asked, _ = self._waiting.pop(victim)
        victim.cancel()
        self.log.info("control_client_dropped", reason="evicted_idle" if asked else "evicted_silent")
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = cp.LineDecoder(cp.MAX_REQUEST_LINE)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        asked = False
        connected = loop.time()
        while True:
            # Until it has asked once, a client is timed from its connection, not from its last byte.
            self._waiting[task] = (asked, loop.time() if asked else connected)
            limit = IDLE_TIMEOUT if asked else max(0.0, connected + FIRST_REQUEST_TIMEOUT - loop.time())
            try:
                data = await asyncio.wait_for(reader.read(_READ), limit)
            except TimeoutError:
                waited = IDLE_TIMEOUT if asked else FIRST_REQUEST_TIMEOUT
                self.log.info("control_client_dropped", reason="idle" if asked else "no_request", waited_s=waited)
                return
            self._waiting.pop(task, None)
            if not data:
                return
            try:
                requests = decoder.feed(data)
            except cp.RemoteProtocolError as e:
                writer.write(cp.encode(cp.ErrorReply(e.code, str(e)[: cp.MAX_TEXT])))
                return
            asked = asked or bool(requests)
            for req in requests:
                if isinstance(req, cp.StatusRequest):
                    reply: cp.Message = self._status()
                else:
                    reply = cp.ErrorReply("unexpected", f"{req.TYPE} is a reply, not a request")
                writer.write(cp.encode(reply))
            await writer.drain()


class ControlError(Exception):
    """The daemon could not be asked, or answered with an error."""


class ControlClient:
    """Blocking client: connect once, ask as often as wanted."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._decoder = cp.LineDecoder(cp.MAX_REPLY_LINE)
        self._ready: list[cp.Message] = []
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot connect to {self.path}: {e.strerror or e} (is the daemon running?)") from None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def status(self) -> cp.StatusReply:
        reply = self._ask(cp.StatusRequest())
        if not isinstance(reply, cp.StatusReply):
            raise ControlError(f"expected a status reply, got {reply.TYPE}")
        return reply

    def _ask(self, req: cp.Request) -> cp.Message:
        try:
            self._sock.sendall(cp.encode(req))
            while not self._ready:
                data = self._sock.recv(_READ)
                if not data:
                    raise ControlError("the daemon closed the connection without answering")
                self._ready += self._decoder.feed(data)
        except cp.RemoteProtocolError as e:
            raise ControlError(f"bad reply from the daemon: {e}") from None
        except TimeoutError:
            raise ControlError("the daemon did not answer in time") from None
        except OSError as e:
            raise ControlError(f"talking to the daemon failed: {e.strerror or e}") from None
        reply = self._ready.pop(0)
        if isinstance(reply, cp.ErrorReply):
            raise ControlError(f"the daemon refused: {reply.code}: {reply.message}")
        return reply
