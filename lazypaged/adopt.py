"""Custody of sessions across a daemon restart: descriptions on disk, uffds re-adopted.

A daemon killed mid-restore loses its sessions' state, but not necessarily
their userfaultfds: a native client that kept its copy re-hands it
(lazypaged/rehand.py); for the others this module keeps what a restarted
daemon needs to carry on:

* a *description* of every session the daemon alone can resume, written to
  ``state_dir`` as ``<session>.json`` when the session starts and removed
  when its uffd is released: kind, target pid (and its start time, so a
  reused pid is never mistaken for the target), the uffd's descriptor number
  in the target when it holds one, the ranges and their sources, the
  failure policy;
* under systemd, the uffd itself, parked in the file-descriptor store as
  ``uffd-<session>`` (lazypaged/fdstore.py).

On start, each description is matched with a uffd: from the store
(``LISTEN_FDNAMES``), else taken from the target with ``pidfd_getfd(2)``
(the target still holds it — Firecracker does; needs ptrace rights over the
target, which root has). The session is rebuilt as a registered handoff with
fill on (pages already present answer EEXIST and count as installed), every
range is woken (faults the dead daemon read but never served are raised
again) and served to the end. Without a uffd the description is dropped
with an ``adoption_failed`` log line: the target then blocks on its missing
pages for good (it never reads zeros while it holds its uffd).

Sources are opened again as a handoff opens them: a ``peer://`` export whose
link is down is retried up to ``[remote] reconnect_deadline``, then the
adoption fails as above. Adoptions run side by side, and the daemon is
ready (``READY=1``) once all of them are settled.

Native sessions whose client keeps its uffd are not described here: their
client re-hands them, and two daemons' worth of sessions on one uffd would
serve it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from . import fdstore
from . import uffd as _uffd
from .config import Config
from .received_uffd import Refused, inspect_uffd
from .session import Mapping, Region, RestoreSession
from .sessions import SessionTable
from .sources import PageSource, SourceError
from .sources.open import open_source
from .sources.registry import SourceRegistry
from .sources.remote import PeerPool

_SYS_PIDFD_GETFD = 438
_SYS_KCMP = 312
_KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)
#: Kinds a restarted daemon can resume (CRIU targets have their own keeper).
ADOPTABLE_KINDS = ("native", "firecracker")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy of descriptor ``target_fd`` of the process behind ``pidfd`` (close-on-exec)."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return int(fd)


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether two descriptors refer to the same open file (``kcmp(2)``)."""
    r = _libc.syscall(_SYS_KCMP, pid1, pid2, _KCMP_FILE, fd1, fd2)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp: {os.strerror(err)}")
    return bool(r == 0)


def find_fd_in(pid: int, our_fd: int) -> int:
    """The number under which process ``pid`` holds the file of our ``our_fd``; -1 if it does not."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return -1
    me = os.getpid()
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[userfaultfd]":
                continue
            if same_file(me, our_fd, pid, int(name)):
                return int(name)
        except (OSError, ValueError):
            continue
    return -1


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: with the pid, names one process for good."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class RangeDesc:
    start: int
    length: int
    source: str
    offset: int
    page_size: int


@dataclass(frozen=True)
class Description:
    session: str
    kind: str
    pid: int
    start_time: int
    #: The uffd's descriptor number in the target, or -1 (it holds none).
    target_fd: int
    features: int
    failure_policy: str
    ranges: tuple[RangeDesc, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Description:
        d = json.loads(text)
        d["ranges"] = tuple(RangeDesc(**r) for r in d["ranges"])
        desc = cls(**d)
        if desc.kind not in ADOPTABLE_KINDS or desc.pid < 0 or not desc.ranges:
            raise ValueError(f"not a resumable session: kind {desc.kind!r}, pid {desc.pid}")
        return desc


def describe(s: RestoreSession) -> Description | None:
    """What a restarted daemon needs to resume ``s`` (None: nothing it could do).

    A forked child's session has no pid (the fork event does not name the
    child): it is described with pid 0 and can come back from the fd store
    only; without one, its uffd dies with the daemon (docs/reliability.md).
    """
    if s.kind not in ADOPTABLE_KINDS or s.uffd.closed:
        return None
    if s.kind == "native" and s.keeps_uffd:
        return None  # its client re-hands it
    if not s.pid:
        return _describe(s, 0, 0, -1)
    try:
        st = start_time(s.pid)
    except (OSError, ValueError, IndexError):
        return None
    return _describe(s, s.pid, st, find_fd_in(s.pid, s.uffd.fileno()))


def _describe(s: RestoreSession, pid: int, st: int, target_fd: int) -> Description:
    ranges = tuple(
        RangeDesc(m.start, m.end - m.start, m.region.source.name, m.region.offset + (m.first << m.region.shift),
                  m.region.page)
        for m in s.mappings
    )
    return Description(s.id, s.kind, pid, st, target_fd, s.uffd.features, s.failure_policy, ranges)


def state_path(cfg: Config) -> Path:
    """``[daemon] state_dir``, or ``state/`` beside the handoff socket."""
    return Path(cfg.state_dir) if cfg.state_dir else cfg.handoff_socket.parent / "state"


def _forget(path: Path) -> None:
    """A description is gone once adopted or given up (a small local unlink)."""
    path.unlink(missing_ok=True)


def _fdname(sid: str) -> str:
    return f"uffd-{sid}"


class Custody:
    """A daemon listener: saves descriptions as sessions start, adopts them at start."""

    def __init__(self, cfg: Config, registry: SourceRegistry, sessions: SessionTable) -> None:
        self.cfg = cfg
        self.registry = registry
        self.sessions = sessions
        self.dir = state_path(cfg)
        self.log = structlog.get_logger().bind(listener="custody")
        self._described: set[str] = set()
        self._stored: set[str] = set()
        #: Inherited uffds no description claims: held (closing one would
        #: zero-fill its target), never served.
        self.orphans: list[int] = []
        self.adopted = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Hooks first: an adopted session is described (and parked) again
        # under its new id, so a second crash finds it too.
        self.sessions.on_added.append(self._added)
        self.sessions.on_removed.append(self._removed)
        inherited = {name: fds for name, fds in fdstore.inherited().items() if name.startswith("uffd-")}
        remote: list[tuple[Path, Description, list[int], str]] = []
        for path in sorted(self.dir.glob("*.json")):
            name = _fdname(path.stem)
            fds = inherited.pop(name, [])
            desc = self._read(path, fds)
            if desc is None:
                continue
            if any(PeerPool.handles(r.source) for r in desc.ranges):
                remote.append((path, desc, fds, name))
            elif await self._adopt(path, desc, fds) and fds:
                fdstore.remove(name)  # parked again under the new session's name
        # Side by side: a peer:// source whose link is down makes its
        # adoption wait up to reconnect_deadline, and no other may wait on it.
        results = await asyncio.gather(*(self._adopt(path, desc, fds) for path, desc, fds, _ in remote))
        for (_path, _desc, fds, name), adopted in zip(remote, results, strict=True):
            if adopted and fds:
                fdstore.remove(name)
        for name, fds in inherited.items():
            self.log.error("orphan_uffd", fdname=name, reason="no session description in the state directory")
            self.orphans += fds

    def stop_accepting(self) -> None:
        pass

    async def close_connections(self) -> None:
        pass

    # -- saving -------------------------------------------------------------------
    def _added(self, s: RestoreSession) -> None:
        try:
            desc = describe(s)
            if desc is None:
                return
            tmp = self.dir / f".{s.id}.tmp"
            tmp.write_text(desc.to_json())
            tmp.rename(self.dir / f"{s.id}.json")
            self._described.add(s.id)
            if fdstore.available() and fdstore.store(s.uffd.fileno(), _fdname(s.id)):
                self._stored.add(s.id)
            s.log.debug("custody_saved", target_fd=desc.target_fd, fdstore=s.id in self._stored)
        except OSError as e:
            s.log.warning("custody_not_saved", error=str(e))

    def _removed(self, s: RestoreSession) -> None:
        if s.id in self._described:
            self._described.discard(s.id)
            with contextlib.suppress(OSError):
                (self.dir / f"{s.id}.json").unlink()
        if s.id in self._stored:
            self._stored.discard(s.id)
            fdstore.remove(_fdname(s.id))

    # -- adopting ---------------------------------------------------------------------
    def _read(self, path: Path, fds: list[int]) -> Description | None:
        try:
            return Description.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError) as e:
            self.log.error("adoption_failed", session=path.stem, reason=f"unreadable description: {e}")
            self.orphans += fds
            path.unlink(missing_ok=True)
            return None

    async def _adopt(self, path: Path, desc: Description, fds: list[int]) -> bool:
        log = self.log.bind(session=path.stem, kind=desc.kind, pid=desc.pid)
        for extra in fds[1:]:
            self.orphans.append(extra)
        fd = fds[0] if fds else -1
        pidfd = -1
        try:
            if desc.pid == 0 and fd < 0:
                raise OSError(errno.EBADF, "a forked child's uffd comes back only from the fd store")
            if desc.pid:
                pidfd = os.pidfd_open(desc.pid)
                if start_time(desc.pid) != desc.start_time:
                    raise ProcessLookupError(errno.ESRCH, "the pid now names another process")
            if fd < 0:
                if desc.target_fd < 0:
                    raise OSError(errno.EBADF, "the target holds no copy of its uffd and none was stored")
                fd = pidfd_getfd(pidfd, desc.target_fd)
            await self._resume(desc, fd, pidfd if pidfd >= 0 else None, from_store=bool(fds), log=log)
        except (OSError, ValueError, IndexError, Refused, SourceError) as e:
            log.error("adoption_failed", reason=str(e))
            if pidfd >= 0:
                os.close(pidfd)
            if fd >= 0:
                self.orphans.append(fd)  # never close a uffd we cannot serve
            _forget(path)
            return False
        _forget(path)  # the new session wrote its own
        return True

    async def _resume(self, desc: Description, fd: int, pidfd: int | None, *, from_store: bool, log: Any) -> None:
        features, _ = inspect_uffd(fd, desc.features, log)
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[userfaultfd]":
            raise Refused("bad_fd", "the adopted descriptor is not a userfaultfd")
        acquired: list[PageSource] = []
        try:
            mappings = []
            for r in desc.ranges:
                if desc.kind == "firecracker":
                    src = open_source(self.cfg.firecracker.mem_file, name=r.source)
                else:
                    # A peer's first contact is retried up to reconnect_deadline,
                    # as at handoff: a link down at adoption is ridden out too.
                    src = await self.registry.acquire_async(r.source)
                acquired.append(src)
                mappings.append(Mapping(r.start, r.start + r.length,
                                        Region(src, r.offset, r.length // r.page_size, page=r.page_size), 0))
        except BaseException:
            self._release(desc.kind, acquired)
            raise
        sid = uuid.uuid4().hex[:12]
        session = RestoreSession(
            sid,
            _uffd.Userfaultfd(fd, features),
            mappings,
            self.cfg.session,
            kind=desc.kind,
            pid=desc.pid or None,
            pidfd=pidfd,
            fill=True,  # finds what is present already (EEXIST)
            failure_policy=desc.failure_policy,
            log=structlog.get_logger().bind(session=sid, kind=desc.kind, pid=desc.pid, adopted_from=desc.session),
            host=self.sessions,
        )

        def ended(s: RestoreSession) -> None:
            self._release(desc.kind, acquired)
            s.log.info("session_ended", outcome=s.state, code=s.outcome.code if s.outcome else "",
                       **{k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")})

        session.on_end = ended
        self.sessions.add(session)
        for r in desc.ranges:  # faults the lost daemon read but never served
            with contextlib.suppress(_uffd.UffdError):
                session.uffd.wake(r.start, r.length)
        self.adopted += 1
        log.info("session_adopted", session=sid, from_fdstore=from_store,
                 ranges=len(mappings))
        task = asyncio.get_running_loop().create_task(session.run(), name=f"session-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, kind: str, acquired: list[PageSource]) -> None:
        for src in acquired:
            if kind == "firecracker":
                src.close()
            else:
                self.registry.release(src)
