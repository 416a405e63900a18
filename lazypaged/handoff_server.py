"""The handoff listener: receives a restorer's request and uffd, starts a session.

This is the thin asyncio layer around ``handoff_protocol``: it moves bytes
and file descriptors, checks the request against the daemon's limits and the
target's address space, and reports the session's end to the restorer.

Rules of this file:

* A connection that does not become a session gets exactly one ``error``
  reply (when the peer can still read it) and one ``handoff_refused`` log
  line with the same code; those turned away ``busy`` on arrival, over
  their user's pending limit, are counted in one ``pending_limit`` line per
  burst instead, so a flood cannot flood the log. Nothing a client sends may escape as an
  exception: what is not a known refusal is logged as ``handoff_bug`` and
  refused as ``internal_error``, and the listener keeps serving.
* Every descriptor received is either owned by a session or closed before
  the connection's task ends, on every path.
* Registrations made for a request that is then refused are undone, so the
  restorer's memory is as it was before the handoff.
* A connection that has not delivered its request holds a descriptor and
  nothing else, and only so many: ``MAX_PENDING_PER_UID`` per user (fewer for
  a user the access rules do not admit), ``MAX_PENDING`` in all. Past that,
  a new connection is taken off the backlog and turned away with ``busy`` at
  once, so an idle flood can neither hold the daemon's descriptors nor fill
  the listen backlog in front of other users' restorers; and its first byte
  must come within ``FIRST_BYTE_TIMEOUT``.
* Accepting is paused, never spun, only when accept() itself fails for lack
  of descriptors or memory: later connections then wait in the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import os
import select
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import structlog

from . import handoff_protocol as hp
from . import uffd as _uffd
from .access import AccessControl, Client, client_of, own_socket
from .config import Config
from .received_uffd import Refused, inspect_uffd
from .session import PAGE, Mapping, Region, RestoreSession
from .sessions import SessionTable
from .sources import PageSource, SourceError
from .sources.registry import ForbiddenSource, SourceRegistry, UnknownSource
from .sources.remote import PeerPool
from .target_vmas import UFFD_MISSING_FLAG, Vma, first_gap, page_mismatch, read_vmas
from .unixsock import AncillaryTruncated, PeerCred, listen_unix, peer_cred, recv_fds

_abi = _uffd.abi

_NEEDED_IOCTLS = (1 << _abi._UFFDIO_COPY) | (1 << _abi._UFFDIO_ZEROPAGE)

#: Connections of one user that may owe their request at once. Each costs a
#: descriptor and a task; a restorer sends its request right after
#: connecting, so even a burst of real ones stays far below. One more is
#: refused ``busy`` at once: a user flooding the socket with idle
#: connections holds this many and no more, and other users' restorers are
#: accepted meanwhile.
MAX_PENDING_PER_UID = 64
#: The same for a user the ``[access]`` allow-lists do not admit: its request
#: will be refused anyway, so it may not hold more than a few descriptors.
MAX_PENDING_UNADMITTED = 4
#: All connections owing their request, whoever they belong to.
MAX_PENDING = 512
#: The first byte of the request must arrive this soon after connecting (or
#: within ``request_timeout`` if that is shorter): a restorer writes its
#: request at once, an idle connection is only holding a slot.
FIRST_BYTE_TIMEOUT = 2.0
#: Listen backlog of the handoff socket: room for a burst of restorers
#: while the loop is busy, and for a flood to be drained without filling it.
LISTEN_BACKLOG = 1024
#: After accept() failed for want of descriptors or memory, wait before
#: trying again (the listening socket stays readable, so retrying at once
#: would spin a CPU and flood the log): first this long, doubling while it
#: keeps failing, up to ``ACCEPT_RETRY_MAX``. A connection that finishes its
#: handshake frees a descriptor and retries at once.
ACCEPT_RETRY_DELAY = 0.1
ACCEPT_RETRY_MAX = 2.0
#: At shutdown, how long the connections of ended sessions may take to write
#: their last frame (one small frame each) before they are cut.
REPLY_FLUSH_TIMEOUT = 5.0
#: Descriptors received with one message. The protocol wants one; room for a
#: few more lets a client that sent two get ``too_many_fds`` rather than a
#: truncation (more than this many is refused as ``malformed``).
MAX_FDS = 4
#: A refusal message quotes client-supplied names; keep the reply small.
_MAX_ERROR_TEXT = 2048


#: Wire names of the messages a client might send instead of a request.
_TYPE_NAMES: dict[type, str] = {
    hp.RestoreRequest: "restore", hp.Accepted: "accepted", hp.Error: "error", hp.Complete: "complete",
    hp.Failed: "failed",
}


class _Probe(Exception):
    """The client connected and closed without sending anything."""


class _Idle(Exception):
    """The client connected and sent nothing within the first-byte deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"nothing within {seconds} s")
        self.seconds = seconds


class HandoffServer:
    def __init__(self, cfg: Config, registry: SourceRegistry, sessions: SessionTable) -> None:
        self.cfg = cfg
        self.registry = registry
        self.sessions = sessions
        self.log = structlog.get_logger().bind(listener="handoff")
        self._owns_path = False
        self._sock: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()
        #: Connections of running sessions: they owe their restorer a last frame.
        self._reporting: set[asyncio.Task[None]] = set()
        self._pending = 0
        #: Per uid: connections owing their request, and refusals since it hit its limit.
        self._pending_of: dict[int, int] = {}
        self._limited: dict[int, int] = {}
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = ACCEPT_RETRY_DELAY
        #: Who may connect and restore what (lazypaged/access.py).
        self.access = AccessControl(cfg.access, registry)
        sessions.on_removed.append(lambda s: self.access.forget(s.id))

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on the configured path (or an inherited listening socket)."""
        # A socket inherited from systemd belongs to its socket unit: its path
        # must outlive the daemon, so only a socket we bound is unlinked.
        self._owns_path = sock is None
        self._sock = sock or listen_unix(self.cfg.handoff_socket, self.cfg.socket_mode, LISTEN_BACKLOG)
        if sock is None:
            own_socket(self.cfg.handoff_socket, self.cfg.access.socket_group)
        self._sock.setblocking(False)
        self._resume_accepting()
        self.log.info("listening", path=str(self.cfg.handoff_socket))

    def reload(self, cfg: Config) -> None:
        """Take ``cfg``'s rules for requests that arrive from now on.

        Access rules, ``request_timeout``, ``max_message_bytes``,
        ``max_sessions`` and the session defaults apply to connections
        accepted after this call; running sessions keep the settings they
        started with (each holds its own). The listening socket stays where
        it was bound: moving it needs a restart.
        """
        keep = self.cfg
        self.cfg = dataclasses.replace(
            cfg,
            handoff_socket=keep.handoff_socket,
            socket_mode=keep.socket_mode,
            access=dataclasses.replace(cfg.access, socket_group=keep.access.socket_group),
        )
        # Same object: the table of which client owns which session is kept.
        self.access.cfg = self.cfg.access
        self.log.info("handoff_reloaded", request_timeout=self.cfg.request_timeout,
                      max_message_bytes=self.cfg.max_message_bytes, max_sessions=self.cfg.max_sessions)

    def stop_accepting(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._accepting:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._accepting = False
        sock.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                self.cfg.handoff_socket.unlink()

    async def close_connections(self, flush_timeout: float = REPLY_FLUSH_TIMEOUT) -> None:
        """Cut connections still owing their request; let the others write their last frame.

        The daemon calls this once its sessions have ended, often in the
        same loop iteration as the last one: cancelling a session's
        connection then would drop the ``complete`` or ``failed`` frame its
        restorer waits for. Those get ``flush_timeout`` seconds in all.
        """
        for t in list(self._conns):
            if t not in self._reporting:
                t.cancel()
        owed = [t for t in self._conns if not t.done()]
        if owed:
            _, late = await asyncio.wait(owed, timeout=flush_timeout)
            for t in late:
                t.cancel()
            if late:
                self.log.warning("replies_unsent", connections=len(late), waited_s=flush_timeout)
        await asyncio.gather(*self._conns, return_exceptions=True)

    # -- accepting ---------------------------------------------------------------
    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued.
                delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, ACCEPT_RETRY_MAX)
                self._pause_accepting(f"accept failed: {e.strerror}", delay)
                return
            self._retry_delay = ACCEPT_RETRY_DELAY
            try:
                conn.setblocking(False)
                cred = peer_cred(conn)
                who = client_of(conn, cred)
            except OSError:
                conn.close()  # the peer is gone already: nobody to answer
                continue
            if not self._admit_pending(conn, who):
                continue
            task = loop.create_task(self._serve(conn, cred))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    def _admit_pending(self, conn: socket.socket, who: Client) -> bool:
        """Count ``conn`` against its user's pending limit, or turn it away with ``busy``."""
        uid = who.uid
        try:
            self.access.admit(who)
            limit = MAX_PENDING_PER_UID
        except Refused:
            limit = MAX_PENDING_UNADMITTED
        mine = self._pending_of.get(uid, 0)
        if mine < limit and self._pending < MAX_PENDING:
            self._pending_of[uid] = mine + 1
            self._pending += 1
            return True
        if mine >= limit:
            text = f"uid {uid} already has {mine} connections that have not sent their request; retry later"
        else:
            text = f"{self._pending} connections have not sent their request yet; retry later"
        with contextlib.suppress(OSError):
            conn.send(hp.encode(hp.Error("busy", text)))
        conn.close()
        # One line per burst, not per connection: a flood would fill the log.
        refused = self._limited.get(uid)
        if refused is None:
            self.log.warning("pending_limit", uid=uid, pending=mine, limit=limit, total_pending=self._pending)
            refused = 0
        self._limited[uid] = refused + 1
        return False

    def _pause_accepting(self, reason: str, retry_after: float | None) -> None:
        if self._sock is None or not self._accepting:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._accepting = False
        self.log.warning("accept_paused", reason=reason, pending=self._pending, retry_s=retry_after)
        if retry_after is not None:
            self._retry = loop.call_later(retry_after, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is None or self._accepting:
            return
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
        self._accepting = True

    def _request_done(self, uid: int) -> None:
        self._pending -= 1
        left = self._pending_of[uid] - 1
        if left:
            self._pending_of[uid] = left
        else:
            del self._pending_of[uid]
            refused = self._limited.pop(uid, None)
            if refused is not None:
                self.log.info("pending_limit_cleared", uid=uid, refused=refused)

    # -- one connection -------------------------------------------------------
    async def _serve(self, conn: socket.socket, cred: PeerCred) -> None:
        with conn:
            try:
                await self._serve_connection(conn, cred)
            except Exception as e:  # a bug: log it as one, keep the listener serving
                self.log.error("handoff_bug", error=f"{type(e).__name__}: {e}", exc_info=e)

    async def _serve_connection(self, conn: socket.socket, cred: PeerCred) -> None:
        try:
            session = await self._handshake(conn, cred)
        finally:
            self._request_done(cred.uid)
        if session is None:
            return
        task = asyncio.current_task()
        assert task is not None
        self._reporting.add(task)
        try:
            await self._report(conn, session)
        finally:
            self._reporting.discard(task)

    async def _report(self, conn: socket.socket, session: RestoreSession) -> None:
        """Tell the restorer its session started, then how it ended."""
        await self._send(conn, hp.Accepted(session.id))
        session.log.info(
            "session_started",
            ranges=len(session.mappings),
            bytes=sum(m.end - m.start for m in session.mappings),
            sources=sorted({r.source.name for r in session.regions}),
        )
        outcome = await session.run()
        if outcome.state == "complete":
            st = session.stats
            reply: hp.Message = hp.Complete(
                session.id,
                st.pages_total,
                st.bytes_copied,
                st.bytes_zero,
                st.faults,
                st.seconds,
                pages_poisoned=st.bytes_poisoned // _page_of(session),
            )
        else:
            reply = hp.Failed(session.id, outcome.code, outcome.message)
        try:
            await self._send(conn, reply)
        finally:
            session.release()

    async def _handshake(self, conn: socket.socket, cred: PeerCred) -> RestoreSession | None:
        """Read and check the request; a running session, or None once refused."""
        log = self.log.bind(peer_pid=cred.pid, peer_uid=cred.uid)
        try:
            fd = -1
            try:
                # Checked once the request is read: refusing earlier would
                # close on unread bytes, and the reset can eat the reply.
                req, fd = await asyncio.wait_for(self._read_request(conn), self.cfg.request_timeout)
                who = client_of(conn, cred)
                self.access.admit(who)
                self.access.check_request(who, req, self.sessions)
                # Remote sources are contacted here, without blocking the loop;
                # _start_session then finds them open.
                warm = await self._open_remote(req)
                try:
                    session = self._start_session(req, fd, cred, log)
                finally:
                    for src in warm:
                        self.registry.release(src)
                fd = -1  # owned by the session now
                self.access.note(session.id, who)
            finally:
                if fd >= 0:
                    os.close(fd)
        except _Probe:
            # Connected and closed without a byte: a readiness or health
            # check, not a restorer. Nobody to answer, nothing to warn about.
            log.debug("handoff_probe")
            return None
        except _Idle as e:
            code, text = "timeout", f"nothing sent within {e.seconds} s of connecting"
        except TimeoutError:
            code, text = "timeout", f"no complete request within {self.cfg.request_timeout} s of connecting"
        except (hp.ProtocolError, Refused) as e:
            code, text = e.code, str(e)
        except AncillaryTruncated as e:
            if e.received >= MAX_FDS:
                code, text = "malformed", f"more than {MAX_FDS} file descriptors attached, expected one userfaultfd"
            else:
                code, text = "busy", "the daemon ran out of file descriptors receiving yours; retry later"
        except ConnectionError as e:
            why = e.strerror or "closed"
            code, text = "malformed", f"connection failed before a complete request: {why.lower()}"
        except Exception as e:
            log.error("handoff_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
            code, text = "internal_error", "a bug in the daemon while reading the request; its log has the details"
        else:
            return session
        text = text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "…"
        log.warning("handoff_refused", code=code, error=text)
        await self._send(conn, hp.Error(code, text))
        return None

    async def _send(self, conn: socket.socket, msg: hp.Message) -> None:
        """Best effort: a restorer that hung up does not hear from us."""
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(conn, hp.encode(msg))

    async def _read_request(self, conn: socket.socket) -> tuple[hp.RestoreRequest, int]:
        decoder = hp.FrameDecoder(self.cfg.max_message_bytes)
        fds: list[int] = []
        first = True
        try:
            while True:
                if first:
                    deadline = min(FIRST_BYTE_TIMEOUT, self.cfg.request_timeout)
                    try:
                        data, got = await asyncio.wait_for(recv_fds(conn, 65536, MAX_FDS), deadline)
                    except TimeoutError:
                        raise _Idle(deadline) from None
                else:
                    data, got = await recv_fds(conn, 65536, MAX_FDS)
                if not data and not got and first:
                    raise _Probe
                first = False
                fds += got
                if not data:
                    raise hp.RemoteProtocolError("connection closed before a complete request")
                msgs = decoder.feed(data)
                if not msgs:
                    continue
                if len(msgs) > 1 or decoder.pending:
                    raise hp.RemoteProtocolError("one request per connection: bytes follow the request frame")
                (msg,) = msgs
                if not isinstance(msg, hp.RestoreRequest):
                    raise hp.RemoteProtocolError(f"expected a restore request, got {_TYPE_NAMES[type(msg)]!r}")
                if not fds:
                    raise Refused("no_fd", "no userfaultfd attached (send it with SCM_RIGHTS)")
                if len(fds) > 1:
                    raise Refused("too_many_fds", f"{len(fds)} file descriptors attached, expected one userfaultfd")
                return msg, fds.pop()
        finally:
            for extra in fds:
                os.close(extra)

    # -- validation and registration -------------------------------------------
    def _start_session(self, req: hp.RestoreRequest, fd: int, cred: PeerCred, log: Any) -> RestoreSession:
        """Check ``req`` against the daemon and the target; register; build the session.

        Checks run in the order ``docs/handoff.md`` lists their codes. On any
        failure everything done so far is undone; ``fd`` stays the caller's.
        """
        if len(self.sessions) >= self.cfg.max_sessions:
            raise Refused("busy", f"the daemon already serves {self.cfg.max_sessions} sessions")
        features, api_done = inspect_uffd(fd, req.features, log)
        ranges = _check_ranges(req.ranges)
        pid, pidfd = _open_target(req.pid, cred)
        acquired: list[PageSource] = []
        registered: list[hp.RangeSpec] = []
        uffd = _uffd.Userfaultfd(fd, features)
        try:
            mappings = [self._mapping(r, acquired) for r in ranges]
            _check_page_sizes(pid, ranges)
            vmas: list[Vma] | None
            if req.registered:
                if api_done is False:
                    # The kernel registers nothing on a uffd before UFFDIO_API.
                    raise Refused("not_registered", "UFFDIO_API was never called on the attached userfaultfd, "
                                  "so nothing can be registered with it")
                vmas = _check_registered(uffd, pid, ranges)
            else:
                if api_done is False:
                    raise Refused("register_failed", "UFFDIO_API was never called on the attached userfaultfd")
                _register_all(uffd, ranges, registered)
                vmas = _check_mapped(pid, ranges)
            if vmas is not None:
                mappings = _split_at_vmas(mappings, vmas)
            elif pid > 0:
                # Without CAP_SYS_PTRACE (the shipped unit): what could be proved
                # from the uffd alone was, the rest is documented in _read_target.
                log.debug("address_space_unreadable", pid=pid,
                          checks="registration by the uffd alone; no hole check, no split at mappings")
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
                working_set=None if req.options.working_set is False else self.cfg.working_set,
                failure_policy=req.options.failure_policy,
                log=structlog.get_logger().bind(session=sid, kind="native", pid=pid),
                host=self.sessions,
            )
        except BaseException:
            for r in registered:
                with contextlib.suppress(_uffd.UffdError):
                    uffd.unregister(r.start, r.length)
            for src in acquired:
                self.registry.release(src)
            if pidfd is not None:
                os.close(pidfd)
            raise
        session.keeps_uffd = req.keeps_uffd
        session.release_after_reply = True  # unregistered only once `complete` is sent

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

    async def _open_remote(self, req: hp.RestoreRequest) -> list[PageSource]:
        """Acquire the request's remote sources (first contact with a peer)."""
        opened: list[PageSource] = []
        try:
            for name in sorted({r.source for r in req.ranges if PeerPool.handles(r.source)}):
                with _refusals():
                    opened.append(await self.registry.acquire_async(name))
        except BaseException:
            for src in opened:
                self.registry.release(src)
            raise
        return opened

    def _mapping(self, r: hp.RangeSpec, acquired: list[PageSource]) -> Mapping:
        """Open ``r``'s snapshot (appended to ``acquired``) and place it at ``r.start``."""
        with _refusals():
            if not PeerPool.handles(r.source):
                self.registry.resolve(r.source)  # forbidden names first
                if os.path.basename(r.source) in ("", "."):
                    # The path resolves to the file, but the name says a directory.
                    raise UnknownSource(f"snapshot name {r.source!r} names a directory, not a snapshot file")
            src = self.registry.acquire(r.source)
        acquired.append(src)
        if r.offset + r.length > src.size:
            raise Refused(
                "bad_range",
                f"range {r.start:#x}+{r.length:#x} at offset {r.offset:#x} runs past the end of "
                f"{r.source!r} ({src.size} bytes)",
            )
        ps = r.page_size or PAGE
        return Mapping(r.start, r.end, Region(src, r.offset, r.length // ps, page=ps), 0)


def _page_of(session: RestoreSession) -> int:
    """The page ``complete`` counts in: the ranges' own when they agree (hugetlb), else the base page."""
    sizes = {r.page for r in session.regions}
    return sizes.pop() if len(sizes) == 1 else PAGE


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Source lookup errors as the refusal codes the client sees."""
    try:
        yield
    except UnknownSource as e:
        raise Refused("unknown_source", str(e)) from None
    except ForbiddenSource as e:
        raise Refused("forbidden_source", str(e)) from None
    except SourceError as e:
        raise Refused("source_error", str(e)) from None


def _check_ranges(specs: tuple[hp.RangeSpec, ...]) -> list[hp.RangeSpec]:
    """The ranges by address, once each is page-aligned and none overlap."""
    ranges = sorted(specs, key=lambda r: r.start)
    for r in ranges:
        ps = r.page_size or PAGE
        if r.start % ps or r.length % ps or r.offset % PAGE:
            raise Refused(
                "bad_range",
                f"range {r.start:#x}+{r.length:#x} (offset {r.offset:#x}) is not aligned to its page size {ps}",
            )
    for a, b in itertools.pairwise(ranges):
        if b.start < a.end:
            raise Refused("overlap", f"ranges {a.start:#x}+{a.length:#x} and {b.start:#x}+{b.length:#x} overlap")
    return ranges


def _open_target(named: int | None, cred: PeerCred) -> tuple[int, int | None]:
    """The target's pid and a pidfd watching it.

    Without a ``pid`` the target is the peer itself (its pidfd may be
    unavailable, e.g. across pid namespaces, and the session then simply has
    no watch). A named pid must exist and, unless the peer is root, run as
    the peer's user: the daemon signals that process on a forced shutdown,
    and a client may not point it at someone else's.
    """
    if named is None or named == cred.pid:
        try:
            return cred.pid, os.pidfd_open(cred.pid)
        except OSError:
            return cred.pid, None
    try:
        pidfd = os.pidfd_open(named)
    except (OSError, OverflowError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise Refused("bad_pid", f"cannot watch process {named}: {reason}") from None
    try:
        if cred.uid != 0:
            uids = _process_uids(named)
            # kill(2)'s rule: the sender's uid matches the target's real or saved uid.
            if cred.uid not in (uids[0], uids[2]):
                raise Refused("bad_pid", f"process {named} does not belong to uid {cred.uid}")
        # Checked last: the uids read above belong to the pidfd's process only
        # if it is alive now (a pid is not reused before its process is reaped).
        if _exited(pidfd):
            raise Refused("bad_pid", f"process {named} has exited")
    except OSError as e:
        os.close(pidfd)
        raise Refused("bad_pid", f"cannot check process {named}: {e.strerror}") from None
    except BaseException:
        os.close(pidfd)
        raise
    return named, pidfd


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _process_uids(pid: int) -> tuple[int, int, int]:
    """Real, effective and saved uid of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                real, effective, saved = (int(x) for x in line.split()[1:4])
                return real, effective, saved
    raise OSError(errno.ESRCH, f"no Uid line for process {pid}")


def _check_page_sizes(pid: int, ranges: list[hp.RangeSpec]) -> None:
    """A declared ``page_size`` is the one the kernel maps that memory with.

    Huge pages declared over ordinary memory would have the daemon copy a
    2 MiB piece per fault into 4 KiB pages; the kernel alone knows which
    memory is hugetlb. (Huge memory declared with base pages is found at
    registration, without reading smaps.)
    """
    declared = [r for r in ranges if r.page_size]
    if not declared or pid <= 0:
        return
    vmas = _read_target(pid, flags=True)
    if vmas is None:
        return  # registration still refuses huge pages declared over memory that grants UFFDIO_ZEROPAGE
    for r in declared:
        v = page_mismatch(vmas, r.start, r.end, r.page_size)
        if v is not None:
            raise Refused(
                "bad_range",
                f"range {r.start:#x}+{r.length:#x} declares page_size {r.page_size}, but the kernel maps "
                f"{v.start:#x}..{v.end:#x} with {v.page}-byte pages"
                + (" (it is not hugetlb memory: leave page_size out)" if v.page == PAGE else ""),
            )


def _read_target(pid: int, *, flags: bool = False) -> list[Vma] | None:
    """``pid``'s mappings, or None when the daemon may not read them.

    /proc/PID/maps and smaps need ptrace read access: a daemon without
    CAP_SYS_PTRACE (the shipped unit) is refused them for a target of
    another uid, or a root one holding capabilities it lacks. The callers
    then check what the uffd alone can prove, and skip the rest: a range
    with a hole is registered around it, a range across two mappings is
    not cut (the session copies page by page where a copy fails ENOENT),
    and a declared page size is checked only by what registration grants.
    Any other failure (the process is gone) is a refusal.
    """
    try:
        return read_vmas(pid, flags=flags)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return None
        raise Refused("bad_pid", f"cannot read the address space of process {pid}: {e.strerror}") from None


def _split_at_vmas(mappings: list[Mapping], vmas: list[Vma]) -> list[Mapping]:
    """The mappings cut where the target's mappings (VMAs) begin and end.

    One UFFDIO_COPY must stay inside one VMA: across a boundary (part of a
    range mprotect()ed, two adjacent mmaps) the whole call fails with
    ENOENT, as if nothing were mapped there. Cut here, no copy of the
    session crosses a boundary the target had at handoff; parts with no
    VMA at all (a re-handed range the target unmapped a piece of) get no
    mapping, and their pages count as gone.
    """
    out: list[Mapping] = []
    for m in mappings:
        shift = m.region.shift
        for v in vmas:
            lo, hi = max(m.start, v.start), min(m.end, v.end)
            if lo < hi:
                out.append(Mapping(lo, hi, m.region, m.first + ((lo - m.start) >> shift)))
    return out


def _check_mapped(pid: int, ranges: list[hp.RangeSpec]) -> list[Vma] | None:
    """Every byte of every range is mapped in the target.

    UFFDIO_REGISTER takes a range with holes in it and registers only what
    is mapped: memory mapped into a hole later would never fault to us, and
    the target would read zeros where the snapshot has data.
    """
    if pid <= 0:
        return None  # the peer's pid is not visible here: nothing to read
    vmas = _read_target(pid)
    if vmas is None:
        return None
    for r in ranges:
        gap = first_gap(vmas, r.start, r.end)
        if gap is not None:
            raise Refused(
                "register_failed",
                f"range {r.start:#x}+{r.length:#x} is not wholly mapped in process {pid}: "
                f"nothing at {gap[0]:#x}..{gap[1]:#x}",
            )
    return vmas


def _check_registered(uffd: _uffd.Userfaultfd, pid: int, ranges: list[hp.RangeSpec]) -> list[Vma] | None:
    """A request that says its ranges are registered: prove they are, on this uffd.

    The target's VmFlags show ``um`` wherever *some* uffd is registered in
    missing mode, and only there; registering the same memory again with
    the attached uffd then succeeds only if that uffd is this one (another
    one's answers EBUSY), and changes nothing. Both together: every mapped
    byte of every range is registered, in missing mode, with the uffd we
    serve. Unmapped parts are allowed: a target re-handed after it unmapped
    part of a range has them, and nothing can be read there (memory mapped
    there later is new memory, zeros by right). Returns None when the
    target's mappings cannot be read (checked by the uffd alone, below).
    """
    if pid <= 0:
        raise Refused("not_registered", "cannot verify the registration: the target's pid is not visible here")
    vmas = _read_target(pid, flags=True)
    if vmas is None:
        # No VmFlags to read. Registering each range again with the attached
        # uffd, in missing mode, still proves enough: the kernel answers
        # EBUSY where another uffd holds any of it, and on success every
        # mapped byte is this uffd's in missing mode, so every page not yet
        # present faults to us. Memory that was not registered before is now
        # (the claim made true, as a normal handoff would have; it is not
        # undone on a later refusal, since what was already registered cannot
        # be told apart). EINVAL means part of it is unmapped as a whole or
        # cannot be served by a uffd at all: only the maps could tell which.
        _register_all(uffd, ranges, [], refusal="not_registered", unverified_pid=pid)
        return None
    mapped: list[hp.RangeSpec] = []
    for r in ranges:
        for v in vmas:
            lo, hi = max(r.start, v.start), min(r.end, v.end)
            if lo >= hi:
                continue
            if UFFD_MISSING_FLAG not in v.flags:
                raise Refused(
                    "not_registered",
                    f"range {r.start:#x}+{r.length:#x} is said to be registered, but {lo:#x}..{hi:#x} is "
                    f"not registered with a userfaultfd in missing mode in process {pid}",
                )
            mapped.append(dataclasses.replace(r, start=lo, length=hi - lo))
    # Nothing to undo on a refusal: memory that registers again was ours already.
    _register_all(uffd, mapped, [], refusal="not_registered")
    return vmas


def _register_all(
    uffd: _uffd.Userfaultfd,
    ranges: list[hp.RangeSpec],
    done: list[hp.RangeSpec],
    refusal: str = "register_failed",
    unverified_pid: int = 0,
) -> None:
    """Register every range; ``done`` lists those registered, for the caller to undo.

    ``unverified_pid``: a claimed registration is being checked without the
    target's maps; a failure other than EBUSY then says what would have
    allowed checking it.
    """
    for r in ranges:
        try:
            ioctls = uffd.register(r.start, r.length)
        except _uffd.UffdError as e:
            if unverified_pid and e.errno != errno.EBUSY:
                raise Refused(
                    "not_registered",
                    f"range {r.start:#x}+{r.length:#x} is said to be registered, but it cannot be registered "
                    f"with the attached userfaultfd ({os.strerror(e.errno or 0)}): unmapped as a whole, or "
                    f"memory a userfaultfd cannot serve; the daemon cannot read the mappings of process "
                    f"{unverified_pid} to tell (that needs CAP_SYS_PTRACE)",
                ) from None
            if refusal == "not_registered":
                raise Refused(
                    "not_registered",
                    f"range {r.start:#x}+{r.length:#x} is said to be registered, but not with the attached "
                    f"userfaultfd ({os.strerror(e.errno or 0)})",
                ) from None
            raise Refused(
                "register_failed",
                f"cannot register {r.start:#x}+{r.length:#x} in the target ({os.strerror(e.errno or 0)}); "
                "is it mapped, private anonymous or shared memory, and not registered with another uffd?",
            ) from None
        done.append(r)
        huge = (r.page_size or PAGE) > PAGE
        if not huge and ioctls & _NEEDED_IOCTLS == 1 << _abi._UFFDIO_COPY:
            raise Refused(
                "bad_range",
                f"range {r.start:#x}+{r.length:#x} is huge-page memory (no UFFDIO_ZEROPAGE there): "
                "give its page_size in the request",
            )
        if huge and ioctls & 1 << _abi._UFFDIO_ZEROPAGE:
            # Granted only where no mapping in the range is hugetlb.
            raise Refused(
                "bad_range",
                f"range {r.start:#x}+{r.length:#x} declares page_size {r.page_size}, but it is not hugetlb "
                "memory (UFFDIO_ZEROPAGE is allowed there): leave page_size out",
            )
        needed = 1 << _abi._UFFDIO_COPY if huge else _NEEDED_IOCTLS
        if ioctls & needed != needed:
            raise Refused(
                "register_failed",
                f"range {r.start:#x}+{r.length:#x} does not allow UFFDIO_COPY and UFFDIO_ZEROPAGE "
                f"(granted: {_abi.ioctl_names(ioctls)})",
            )
