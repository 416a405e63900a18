"""A listener that speaks Firecracker's UFFD handshake.

Firecracker (``mem_backend`` of type ``Uffd``) connects, sends the JSON list
of guest regions with the uffd attached, and expects no answer: it already
registered the regions and simply runs the VM. Faults are served from the
configured memory file at ``offset + (address - base)``; the balloon's
``madvise(MADV_DONTNEED)`` arrives as REMOVE events and those pages come
back as zeros (session.py).

A handshake that cannot be served is logged (``handoff_refused`` with the
reason). Its uffd is *not* closed while the VM lives: the regions are
registered, and dropping the last reference would let the kernel zero-fill
guest memory. It is kept until the VM process exits (or the daemon stops),
so the VM waits on the faults rather than running on wrong memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import structlog

from . import firecracker_protocol as fp
from . import uffd as _uffd
from .config import Config
from .received_uffd import Refused, inspect_uffd
from .session import Mapping, Region, RestoreSession
from .sessions import SessionTable
from .sources import PageSource, SourceError
from .sources.open import open_source
from .unixsock import AncillaryTruncated, PeerCred, listen_unix, peer_cred, recv_fds

#: Firecracker sends one uffd; a few more are read (and closed) so that a
#: confused client gets a clear refusal rather than a truncated message.
MAX_FDS = 4


class FirecrackerServer:
    def __init__(self, cfg: Config, sessions: SessionTable) -> None:
        self.cfg = cfg
        self.path = Path(cfg.firecracker.socket)
        self.mem_file = Path(cfg.firecracker.mem_file)
        self.sessions = sessions
        self.log = structlog.get_logger().bind(listener="firecracker")
        self._sock: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()
        #: Refused uffds kept until their VM exits: fd -> pidfd (or -1).
        self._parked: dict[int, int] = {}

    async def start(self) -> None:
        if not self.mem_file.is_file():
            raise FileNotFoundError(f"firecracker.mem_file {self.mem_file} is not a file")
        self._sock = listen_unix(self.path, self.cfg.socket_mode)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
        self.log.info("listening", path=str(self.path), mem_file=str(self.mem_file))

    def stop_accepting(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def close_connections(self) -> None:
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for fd in list(self._parked):
            self._unpark(fd)

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

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                cred = peer_cred(conn)
            except OSError:
                return
            log = self.log.bind(peer_pid=cred.pid, peer_uid=cred.uid)
            fds: list[int] = []
            session = None
            try:
                regions = await asyncio.wait_for(self._read(conn, fds), self.cfg.request_timeout)
                if not fds:
                    raise Refused("no_fd", "no userfaultfd attached to the handshake")
                if len(fds) > 1:
                    raise Refused("too_many_fds", f"{len(fds)} descriptors attached, expected one userfaultfd")
                session = self._start_session(regions, fds[0], cred, log)
                fds.clear()
            except TimeoutError:
                self._refuse(log, "timeout", f"no complete handshake within {self.cfg.request_timeout} s", fds, cred)
            except fp.FirecrackerProtocolError as e:
                self._refuse(log, "malformed", str(e), fds, cred)
            except Refused as e:
                self._refuse(log, e.code, str(e), fds, cred)
            except (AncillaryTruncated, ConnectionError) as e:
                self._refuse(log, "malformed", f"connection failed during the handshake: {e}", fds, cred)
            except Exception as e:
                log.error("handoff_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
                self._refuse(log, "internal_error", f"{type(e).__name__}: {e}", fds, cred)
            if session is not None:
                await session.run()

    async def _read(self, conn: socket.socket, fds: list[int]) -> list[fp.GuestRegion]:
        decoder = fp.HandshakeDecoder(self.cfg.max_message_bytes)
        while True:
            data, got = await recv_fds(conn, 65536, MAX_FDS)
            fds += got
            regions = decoder.feed(data) if data else decoder.finish()
            if regions is not None:
                return regions

    def _start_session(self, regions: list[fp.GuestRegion], fd: int, cred: PeerCred, log: Any) -> RestoreSession:
        if len(self.sessions) >= self.cfg.max_sessions:
            raise Refused("busy", f"the daemon already serves {self.cfg.max_sessions} sessions")
        features, _ = inspect_uffd(fd, 0, log)
        try:
            src = open_source(self.mem_file, name=self.mem_file.name)
        except SourceError as e:
            raise Refused("source_error", str(e)) from None
        try:
            for r in regions:
                if r.offset + r.size > src.size:
                    raise Refused(
                        "bad_range",
                        f"region {r.base:#x}+{r.size:#x} at offset {r.offset:#x} runs past the end of "
                        f"{self.mem_file} ({src.size} bytes)",
                    )
            mappings = [
                Mapping(r.base, r.end, Region(src, r.offset, r.size // r.page_size, page=r.page_size), 0)
                for r in regions
            ]
        except BaseException:
            src.close()
            raise
        pidfd = None
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(cred.pid)
        sid = uuid.uuid4().hex[:12]
        session = RestoreSession(
            sid,
            _uffd.Userfaultfd(fd, features),
            mappings,
            self.cfg.session,
            kind="firecracker",
            pid=cred.pid,
            pidfd=pidfd,
            log=structlog.get_logger().bind(session=sid, kind="firecracker", pid=cred.pid),
            host=self.sessions,
            working_set=self.cfg.working_set,
        )
        session.on_end = lambda s: _ended(s, src)
        self.sessions.add(session)
        session.log.info(
            "session_started",
            ranges=len(mappings),
            bytes=sum(r.size for r in regions),
            sources=[src.name],
        )
        return session

    def _refuse(self, log: Any, code: str, text: str, fds: list[int], cred: PeerCred) -> None:
        log.warning("handoff_refused", code=code, error=text)
        # The first fd may be a uffd with registered guest memory: keep it.
        for fd in fds[1:]:
            os.close(fd)
        if fds:
            self._park(fds[0], cred.pid)
        fds.clear()

    def _park(self, fd: int, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        self._parked[fd] = pidfd
        if pidfd >= 0:
            asyncio.get_running_loop().add_reader(pidfd, self._unpark, fd)

    def _unpark(self, fd: int) -> None:
        pidfd = self._parked.pop(fd, -1)
        if pidfd >= 0:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        os.close(fd)


def _ended(s: RestoreSession, src: PageSource) -> None:
    src.close()
    s.log.info(
        "session_ended",
        outcome=s.state,
        code=s.outcome.code if s.outcome else "",
        **{k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")},
    )
