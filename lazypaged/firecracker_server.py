"""A listener that speaks Firecracker's UFFD handshake.

Firecracker (``mem_backend`` of type ``Uffd``) connects, sends the JSON list
of guest regions with the uffd attached, and expects no answer: it already
registered the regions and simply runs the VM. Faults are served from the
configured memory file at ``offset + (address - base)``; the balloon's
``madvise(MADV_DONTNEED)`` arrives as REMOVE events and those pages come
back as zeros (session.py).

Who may connect is decided as on the handoff socket (lazypaged/access.py):
the socket gets ``socket_mode`` and ``[access] socket_group``, the peer's
uid and groups (``SO_PEERCRED``, ``SO_PEERGROUPS``) must pass
``allow_uids``/``allow_gids``, and the memory file, as a resolved path, must
pass the tenant rules. A SIGHUP reload changes all of these for new
connections.

A handshake that cannot be served is logged (``handoff_refused`` with the
reason) and everything it carried is closed at once: a refused client
cannot make the daemon hold descriptors. A received uffd has registered
guest memory, though, and closing its last copy would let the kernel
zero-fill it. Firecracker keeps its own copy, which is checked (``kcmp``
against the peer's descriptors): held, ours is simply closed. Held by no one
else, the peer is killed first (through a pidfd taken at connect time, so a
reused pid is never hit) and ours closed once it is gone: a clear failure,
never wrong memory. When the peer's descriptors cannot be read (no ptrace
rights over it), the VMM's own copy is assumed, as Firecracker keeps one,
and the line says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import firecracker_protocol as fp
from . import uffd as _uffd
from .access import AccessControl, client_of, own_socket
from .adopt import same_file
from .config import Config
from .received_uffd import Refused, inspect_uffd
from .session import Mapping, Region, RestoreSession
from .sessions import SessionTable
from .sources import PageSource, SourceError
from .sources.open import open_source
from .unixsock import AncillaryTruncated, PeerCred, listen_unix, peer_cred, recv_fds

if TYPE_CHECKING:
    from .sources.registry import SourceRegistry

#: Firecracker sends one uffd; a few more are read (and closed) so that a
#: confused client gets a clear refusal rather than a truncated message.
MAX_FDS = 4
#: getsockopt: a pidfd of the peer as of its connect() (Linux 6.5).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class FirecrackerServer:
    def __init__(self, cfg: Config, sessions: SessionTable, registry: SourceRegistry | None = None) -> None:
        self.cfg = cfg
        self.path = Path(cfg.firecracker.socket)
        self.mem_file = Path(cfg.firecracker.mem_file)
        self.sessions = sessions
        self.registry = registry
        #: The handoff socket's rules: allow-lists and tenant rules.
        self.access = AccessControl(cfg.access, registry)
        self.log = structlog.get_logger().bind(listener="firecracker")
        self._sock: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()
        #: Uffds of killed peers, closed once the peer is gone: fd -> pidfd.
        self._parked: dict[int, int] = {}

    def reload(self, cfg: Config) -> None:
        """New access rules, limits and session settings for new handshakes;
        the socket and the memory file stay (they need a restart)."""
        self.cfg = cfg
        self.access = AccessControl(cfg.access, self.registry)

    async def start(self) -> None:
        if not self.mem_file.is_file():
            raise FileNotFoundError(f"firecracker.mem_file {self.mem_file} is not a file")
        self._sock = listen_unix(self.path, self.cfg.socket_mode)
        try:
            own_socket(self.path, self.cfg.access.socket_group)
        except BaseException:
            self.stop_accepting()
            raise
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
            pidfd = _peer_pidfd(conn, cred.pid)
            log = self.log.bind(peer_pid=cred.pid, peer_uid=cred.uid)
            fds: list[int] = []
            session = None
            try:
                regions = await asyncio.wait_for(self._read(conn, fds), self.cfg.request_timeout)
                self._admit(conn, cred)
                if not fds:
                    raise Refused("no_fd", "no userfaultfd attached to the handshake")
                if len(fds) > 1:
                    raise Refused("too_many_fds", f"{len(fds)} descriptors attached, expected one userfaultfd")
                session = self._start_session(regions, fds[0], cred, pidfd, log)
                fds.clear()
                pidfd = -1  # the session's now
            except TimeoutError:
                self._refuse(log, "timeout", f"no complete handshake within {self.cfg.request_timeout} s", fds,
                             cred, pidfd)
            except fp.FirecrackerProtocolError as e:
                self._refuse(log, "malformed", str(e), fds, cred, pidfd)
            except Refused as e:
                self._refuse(log, e.code, str(e), fds, cred, pidfd)
            except (AncillaryTruncated, ConnectionError) as e:
                self._refuse(log, "malformed", f"connection failed during the handshake: {e}", fds, cred, pidfd)
            except asyncio.CancelledError:
                self._release(log, fds, cred, pidfd)
                pidfd = -1
                raise
            except Exception as e:
                log.error("handoff_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
                self._refuse(log, "internal_error", f"{type(e).__name__}: {e}", fds, cred, pidfd)
            if session is not None:
                await session.run()

    def _admit(self, conn: socket.socket, cred: PeerCred) -> None:
        """The handoff socket's checks: allow-lists, then the tenant rules for the memory file."""
        who = client_of(conn, cred)
        self.access.admit(who)
        self.access.check_path(who, str(self.mem_file), os.path.realpath(self.mem_file))

    async def _read(self, conn: socket.socket, fds: list[int]) -> list[fp.GuestRegion]:
        decoder = fp.HandshakeDecoder(self.cfg.max_message_bytes)
        while True:
            data, got = await recv_fds(conn, 65536, MAX_FDS)
            fds += got
            regions = decoder.feed(data) if data else decoder.finish()
            if regions is not None:
                return regions

    def _start_session(
        self, regions: list[fp.GuestRegion], fd: int, cred: PeerCred, peer_pidfd: int, log: Any
    ) -> RestoreSession:
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
        pidfd = peer_pidfd if peer_pidfd >= 0 else None
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

    def _refuse(self, log: Any, code: str, text: str, fds: list[int], cred: PeerCred, pidfd: int) -> None:
        log.warning("handoff_refused", code=code, error=text)
        self._release(log, fds, cred, pidfd)

    def _release(self, log: Any, fds: list[int], cred: PeerCred, pidfd: int) -> None:
        """Close everything a refused handshake carried, ``pidfd`` included;
        a uffd nobody else holds only after its peer is killed and gone."""
        park = -1
        for fd in fds:
            if not _is_uffd(fd) or park >= 0:
                os.close(fd)
                continue
            held = _held_by(cred.pid, fd)
            if held is False and pidfd >= 0:
                log.error("killing_target", pid=cred.pid,
                          reason="refused handshake: its uffd is held by nobody else, and closing it would "
                                 "zero-fill the target's missing pages")
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                park = fd
                continue
            if held is None:
                log.warning("refused_uffd_closed", pid=cred.pid, held="unknown",
                            reason="the peer's descriptors cannot be read; a VMM keeps its own uffd copy")
            os.close(fd)
        fds.clear()
        if park >= 0:
            self._park(park, pidfd)  # both closed once the peer has exited
        elif pidfd >= 0:
            os.close(pidfd)

    def _park(self, fd: int, pidfd: int) -> None:
        self._parked[fd] = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._unpark, fd)

    def _unpark(self, fd: int) -> None:
        pidfd = self._parked.pop(fd)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        os.close(fd)


def _peer_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the peer that connected, or -1. From the socket when the
    kernel offers it: pidfd_open(pid) may find another process under a
    reused pid."""
    try:
        fd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        try:
            return os.pidfd_open(pid)
        except OSError:
            return -1
    os.set_inheritable(fd, False)
    return fd


def _is_uffd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def _held_by(pid: int, fd: int) -> bool | None:
    """Whether process ``pid`` holds our ``fd``'s file too (``kcmp``); None
    when its descriptors cannot be read. A process that is gone counts as
    holding it: its memory went with it, closing ours harms nothing."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return True
    except OSError:
        return None
    me = os.getpid()
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]" and same_file(
                me, fd, pid, int(name)
            ):
                return True
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                return None
            continue
    return False


def _ended(s: RestoreSession, src: PageSource) -> None:
    src.close()
    s.log.info(
        "session_ended",
        outcome=s.state,
        code=s.outcome.code if s.outcome else "",
        **{k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")},
    )
