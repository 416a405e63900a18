"""The handoff listener: receives a restorer's request and uffd, starts a session.

This is the thin asyncio layer around ``handoff_protocol``: it moves bytes
and file descriptors, checks the request against the daemon's limits and the
target's address space, and reports the session's end to the restorer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import uuid
from typing import Any

import structlog

from . import handoff_protocol as hp
from . import uffd as _uffd
from .config import Config
from .session import PAGE, Mapping, Region, RestoreSession
from .sessions import SessionTable
from .sources import SourceError
from .sources.registry import ForbiddenSource, SourceRegistry, UnknownSource
from .unixsock import listen_unix, peer_cred, recv_fds

#: Event features whose handling this version implements; a restorer that
#: negotiated others (fork, remap) would see them mishandled, so it is refused.
SUPPORTED_EVENTS = _uffd.abi.UFFD_FEATURE_EVENT_REMOVE | _uffd.abi.UFFD_FEATURE_EVENT_UNMAP
_EVENT_FEATURES = (
    _uffd.abi.UFFD_FEATURE_EVENT_FORK
    | _uffd.abi.UFFD_FEATURE_EVENT_REMAP
    | _uffd.abi.UFFD_FEATURE_EVENT_REMOVE
    | _uffd.abi.UFFD_FEATURE_EVENT_UNMAP
)
_NEEDED_IOCTLS = (1 << _uffd.abi._UFFDIO_COPY) | (1 << _uffd.abi._UFFDIO_ZEROPAGE)


class Refused(Exception):
    """A request the daemon will not serve; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HandoffServer:
    def __init__(self, cfg: Config, registry: SourceRegistry, sessions: SessionTable) -> None:
        self.cfg = cfg
        self.registry = registry
        self.sessions = sessions
        self.log = structlog.get_logger().bind(listener="handoff")
        self._sock: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on the configured path (or an inherited listening socket)."""
        self._sock = sock or listen_unix(self.cfg.handoff_socket, self.cfg.socket_mode)
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
        self.log.info("listening", path=str(self.cfg.handoff_socket))

    def stop_accepting(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.cfg.handoff_socket.unlink()

    async def close_connections(self) -> None:
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.error("accept_failed", error=str(e))
                return
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    # -- one connection -------------------------------------------------------
    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                cred = peer_cred(conn)
            except OSError:
                return
            log = self.log.bind(peer_pid=cred.pid, peer_uid=cred.uid)
            fd = -1
            try:
                req, fd = await asyncio.wait_for(self._read_request(conn), self.cfg.request_timeout)
                session = self._start_session(req, fd, cred.pid, log)
                fd = -1  # owned by the session now
            except TimeoutError:
                log.warning("handoff_refused", code="timeout", error="no complete request in time")
                await self._send(conn, hp.Error("timeout", f"no complete request within {self.cfg.request_timeout} s"))
                return
            except (hp.ProtocolError, Refused) as e:
                log.warning("handoff_refused", code=e.code, error=str(e))
                await self._send(conn, hp.Error(e.code, str(e)))
                return
            except ConnectionError as e:
                log.warning("handoff_refused", code="malformed", error=str(e))
                await self._send(conn, hp.Error("malformed", str(e)))
                return
            finally:
                if fd >= 0:
                    os.close(fd)
            await self._send(conn, hp.Accepted(session.id))
            session.log.info(
                "session_started",
                ranges=len(session.regions),
                bytes=session.stats.pages_total * PAGE,
                sources=sorted({r.source.name for r in session.regions}),
            )
            outcome = await session.run()
            if outcome.state == "complete":
                st = session.stats
                reply: hp.Message = hp.Complete(
                    session.id, st.pages_total, st.bytes_copied, st.bytes_zero, st.faults, st.seconds
                )
            else:
                reply = hp.Failed(session.id, outcome.code, outcome.message)
            await self._send(conn, reply)

    async def _send(self, conn: socket.socket, msg: hp.Message) -> None:
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(conn, hp.encode(msg))

    async def _read_request(self, conn: socket.socket) -> tuple[hp.RestoreRequest, int]:
        decoder = hp.FrameDecoder(self.cfg.max_message_bytes)
        fds: list[int] = []
        try:
            while True:
                data, got = await recv_fds(conn, 65536, 4)
                fds += got
                if not data:
                    raise hp.RemoteProtocolError("connection closed before a complete request")
                msgs = decoder.feed(data)
                if not msgs:
                    continue
                if len(msgs) > 1 or decoder.pending:
                    raise hp.RemoteProtocolError("one request per connection")
                (msg,) = msgs
                if not isinstance(msg, hp.RestoreRequest):
                    raise hp.RemoteProtocolError(f"expected a restore request, got {type(msg).__name__}")
                if not fds:
                    raise Refused("no_fd", "no userfaultfd attached (send it with SCM_RIGHTS)")
                if len(fds) > 1:
                    raise Refused("too_many_fds", f"{len(fds)} file descriptors attached, expected one userfaultfd")
                fd = fds.pop()
                return msg, fd
        finally:
            for extra in fds:
                os.close(extra)

    # -- validation and registration -------------------------------------------
    def _start_session(self, req: hp.RestoreRequest, fd: int, peer_pid: int, log: Any) -> RestoreSession:
        if len(self.sessions) >= self.cfg.max_sessions:
            raise Refused("busy", f"the daemon already serves {self.cfg.max_sessions} sessions")
        _check_is_uffd(fd)
        unsupported = req.features & _EVENT_FEATURES & ~SUPPORTED_EVENTS
        if unsupported:
            raise Refused(
                "unsupported_feature",
                f"uffd features {_uffd.abi.feature_names(unsupported)} are not handled by this daemon",
            )
        ranges = sorted(req.ranges, key=lambda r: r.start)
        for r in ranges:
            if r.start % PAGE or r.length % PAGE or r.offset % PAGE:
                raise Refused(
                    "bad_range", f"range {r.start:#x}+{r.length:#x} (offset {r.offset:#x}) is not page-aligned"
                )
        for a, b in itertools.pairwise(ranges):
            if b.start < a.end:
                raise Refused("overlap", f"ranges {a.start:#x}+{a.length:#x} and {b.start:#x}+{b.length:#x} overlap")
        mappings: list[Mapping] = []
        acquired = []
        try:
            for r in ranges:
                try:
                    src = self.registry.acquire(r.source)
                except UnknownSource as e:
                    raise Refused("unknown_source", str(e)) from None
                except ForbiddenSource as e:
                    raise Refused("forbidden_source", str(e)) from None
                except SourceError as e:
                    raise Refused("source_error", str(e)) from None
                acquired.append(src)
                if r.offset + r.length > src.size:
                    raise Refused(
                        "bad_range",
                        f"range {r.start:#x}+{r.length:#x} at offset {r.offset:#x} runs past the end of "
                        f"{r.source!r} ({src.size} bytes)",
                    )
                mappings.append(Mapping(r.start, r.end, Region(src, r.offset, r.length // PAGE), 0))
            uffd = _uffd.Userfaultfd(fd, req.features)
            if not req.registered:
                _register_all(uffd, ranges)
        except BaseException:
            for src in acquired:
                self.registry.release(src)
            raise
        pid = req.pid if req.pid is not None else peer_pid
        pidfd = None
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
        sid = uuid.uuid4().hex[:12]
        session = RestoreSession(
            sid,
            uffd,
            mappings,
            self.cfg.session,
            kind="native",
            pid=pid,
            pidfd=pidfd,
            fault_around=req.options.fault_around,
            fill=req.options.fill,
            log=structlog.get_logger().bind(session=sid, kind="native", pid=pid),
            host=self.sessions,
        )
        session.keeps_uffd = req.keeps_uffd

        def ended(s: RestoreSession) -> None:
            for src in acquired:
                self.registry.release(src)
            s.log.info(
                "session_ended",
                outcome=s.state,
                code=s.outcome.code if s.outcome else "",
                **{k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")},
            )

        session.on_end = ended
        self.sessions.add(session)
        return session


def _check_is_uffd(fd: int) -> None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise Refused("bad_fd", f"cannot inspect the attached fd: {e.strerror}") from None
    if target != "anon_inode:[userfaultfd]":
        raise Refused("bad_fd", f"the attached fd is {target!r}, not a userfaultfd")


def _register_all(uffd: _uffd.Userfaultfd, ranges: list[hp.RangeSpec]) -> None:
    done: list[hp.RangeSpec] = []
    try:
        for r in ranges:
            try:
                ioctls = uffd.register(r.start, r.length)
            except _uffd.UffdError as e:
                raise Refused(
                    "register_failed",
                    f"cannot register {r.start:#x}+{r.length:#x} in the target ({os.strerror(e.errno or 0)}); "
                    "is it mapped, private or shared memory, and not registered already?",
                ) from None
            done.append(r)
            if ioctls & _NEEDED_IOCTLS != _NEEDED_IOCTLS:
                raise Refused(
                    "register_failed",
                    f"range {r.start:#x}+{r.length:#x} does not allow UFFDIO_COPY and UFFDIO_ZEROPAGE "
                    f"(granted: {_uffd.abi.ioctl_names(ioctls)})",
                )
    except Refused:
        for r in done:
            with contextlib.suppress(_uffd.UffdError):
                uffd.unregister(r.start, r.length)
        raise
