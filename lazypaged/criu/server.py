"""Serving ``criu restore --lazy-pages``: the lazy-pages socket and one run per restore.

A :class:`RestoreRun` is one connection of ``criu restore``. For each task
record it reads the task's images, builds a session over the task's lazy
ranges (the bytes come from ``pages-N.img`` mapped zero-copy, or from the
dump's page server) and starts serving faults at once: the restorer itself
touches lazy memory before restore finishes. Background fill waits for the
end-of-restore marker, as CRIU expects. The run is over when every session
(forked children included) has ended; with a page server it then says
CLOSE, which lets the source ``criu dump`` finish.

Every uffd is also handed to the keeper (``keeper.py``), so that a daemon
crash kills unfinished targets instead of letting them read zero pages.

Rules of this file: nothing the restorer sends escapes as an exception
(bad input closes that connection, which makes the restore fail); every
received descriptor is owned by a session or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .. import uffd as _uffd
from ..config import CriuConfig, SessionConfig
from ..session import Mapping, Region, RestoreSession
from ..sessions import SessionTable
from ..sources import PageSource, RawImageSource, SourceError
from ..sources.open import open_source
from ..unixsock import AncillaryTruncated, listen_unix, peer_cred, recv_fds
from . import images as img
from .convert import snapshot_offsets
from .keeper import Keeper
from .procs import find_child, find_task
from .records import RecordError, RecordReader, RestoreFinished, TaskRecord
from .remote import PageServerClient, RemoteTaskSource

SOCKET_NAME = "lazy-pages.socket"
_SUN_PATH_MAX = 107
_run_numbers = itertools.count(1)
#: Outcomes of finished restores kept by a long-running listener.
_KEEP_RESULTS = 32


@dataclass(frozen=True)
class PageServer:
    address: str
    port: int
    #: "auto", "4.1" or "4.2" (see pageserver.py).
    header: str = "auto"
    window: int = 8 << 20


@dataclass
class RunResult:
    ok: bool
    tasks: int = 0
    zombies: int = 0
    sessions: int = 0
    complete: int = 0
    exited: int = 0
    failed: int = 0
    restore_finished: bool = False
    message: str = ""


def task_mappings(task: img.TaskImage, source: PageSource, offsets: list[int] | None = None) -> list[Mapping]:
    """A mapping per lazy range: local sources are addressed by pages-file
    offset, remote ones by dump-time address, snapshots by ``offsets``."""
    out = []
    for k, r in enumerate(task.lazy):
        local = r.start if r.offset is None else r.offset
        offset = offsets[k] if offsets is not None else local
        region = Region(source, offset, r.npages, name=f"criu:{task.pid}:{r.start:#x}")
        out.append(Mapping(r.start, r.end, region, 0))
    return out


class RestoreRun:
    """One ``criu restore --lazy-pages`` connection and the sessions it starts."""

    def __init__(
        self,
        images_dir: Path,
        session_cfg: SessionConfig,
        table: SessionTable,
        *,
        page_server: PageServer | None = None,
        snapshot: Path | None = None,
        keeper: Keeper | None = None,
        log: Any = None,
    ) -> None:
        self.images_dir = images_dir
        self.snapshot = snapshot
        self.cfg = session_cfg
        self.table = table
        self.page_server = page_server
        self.keeper = keeper
        self.number = next(_run_numbers)
        self.log = (log or structlog.get_logger()).bind(restore=self.number)
        self.result = RunResult(ok=False)
        self.sessions: dict[str, RestoreSession] = {}
        self._ended: set[str] = set()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sources: dict[str, PageSource] = {}
        self._client: PageServerClient | None = None
        self._claimed_pids: set[int] = set()
        self._peer_pid = 0

    # -- the connection ---------------------------------------------------------------
    async def serve(self, conn: socket.socket) -> RunResult:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            self._peer_pid = peer_cred(conn).pid
        # From now until its last record is read, a daemon crash must not
        # drop the uffds still queued on this connection (see keeper.py).
        watch = f"restore{self.number}"
        if self.keeper is not None:
            restorer = _pidfd(self._peer_pid)
            self.keeper.watch_connection(watch, conn.fileno(), restorer)
            if restorer is not None:
                os.close(restorer)
        expected: list[img.PstreeEntry] = []
        try:
            expected = img.load_pstree(self.images_dir)
            if self.page_server is not None:
                self._client = await self._connect()
            self.log.info(
                "criu_restore_started", images=str(self.images_dir), tasks=len(expected),
                restorer_pid=self._peer_pid,
                page_server=f"{self.page_server.address}:{self.page_server.port}" if self.page_server else None,
            )
            await self._read_records(conn)
        except (RecordError, img.ImageError, SourceError, _uffd.UffdError) as e:
            self.log.error("criu_restore_broken", error=str(e))
            self.result.message = str(e)
        except (ConnectionError, AncillaryTruncated) as e:
            self.log.error("criu_restore_broken", error=f"lazy-pages socket: {e}")
            self.result.message = str(e)
        finally:
            if self.keeper is not None:
                self.keeper.release(watch)
        if not self.result.restore_finished:
            # The restore failed (or we broke it). Its tasks are probably
            # being killed; fill anyway so every session learns either way.
            self.log.error("criu_restore_incomplete", tasks_seen=self.result.tasks, expected=len(expected))
        for s in list(self.sessions.values()):
            s.start_fill()
        await self._wait_sessions()
        self.log.debug("criu_sessions_over")
        await self._finish()
        r = self.result
        r.ok = r.restore_finished and r.failed == 0 and not r.message
        self.log.info(
            "criu_restore_done", ok=r.ok, tasks=r.tasks, zombies=r.zombies, sessions=r.sessions,
            complete=r.complete, exited=r.exited, failed=r.failed,
            **({"page_server": vars(self._client.stats)} if self._client else {}),
        )
        return r

    async def _connect(self) -> PageServerClient:
        assert self.page_server is not None
        layout = self.page_server.header
        if layout == "auto":
            layout = img.layout_of(self.images_dir) or "4.1"
        client = PageServerClient(
            self.page_server.address, self.page_server.port, layout, bulk_window=self.page_server.window,
            log=self.log,
        )
        await client.connect()
        self.log.info("page_server_connected", server=client.where, header=layout)
        return client

    async def _read_records(self, conn: socket.socket) -> None:
        reader = RecordReader()
        while not reader.finished:
            data, fds = await recv_fds(conn, reader.need(), 2)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("criu restore closed the connection before the end-of-restore marker")
            try:
                ev = reader.feed(data, fds)
            except RecordError:
                for fd in fds:
                    os.close(fd)
                raise
            if isinstance(ev, TaskRecord):
                self._task(ev)
            elif isinstance(ev, RestoreFinished):
                self.result.restore_finished = True
                self.log.info("criu_restore_finished", tasks=self.result.tasks, zombies=self.result.zombies)
                for s in list(self.sessions.values()):
                    s.start_fill()

    # -- tasks ---------------------------------------------------------------------------
    def _task(self, rec: TaskRecord) -> None:
        if rec.fd is None:
            self.result.zombies += 1
            self.log.debug("criu_zombie", pid=-rec.pid)
            return
        fd = rec.fd
        try:
            task = img.load_task(self.images_dir, rec.pid)
            source = self._source_for(task)
            offsets = snapshot_offsets(source, task) if self.snapshot is not None else None
            os.set_blocking(fd, False)
            features = _fdinfo_features(fd)
        except BaseException:
            os.close(fd)
            raise
        host_pid, pidfd = find_task(self._peer_pid, rec.pid, self._claimed_pids)
        sid = f"criu{self.number}-{rec.pid}"
        log = structlog.get_logger().bind(session=sid, kind="criu", pid=host_pid, image_pid=rec.pid)
        session = RestoreSession(
            sid, _uffd.Userfaultfd(fd, features), task_mappings(task, source, offsets), self.cfg,
            kind="criu", pid=host_pid, pidfd=pidfd, log=log, host=self, fill_paused=True,
        )
        self.result.tasks += 1
        log.info(
            "session_started", ranges=len(task.lazy), bytes=task.lazy_pages * img.PAGE, pagemap=task.pagemap.layout,
        )
        self._start(session, pidfd)

    def _source_for(self, task: img.TaskImage) -> PageSource:
        if self.snapshot is not None:
            key = f"snapshot:{self.snapshot}"
            if key not in self._sources:
                try:
                    self._sources[key] = open_source(self.snapshot, name=self.snapshot.name)
                except (OSError, SourceError) as e:
                    raise img.ImageError(f"{self.snapshot}: {e}") from None
            return self._sources[key]
        if self._client is not None:
            key = f"remote:{task.pid}"
            if key not in self._sources:
                self._sources[key] = RemoteTaskSource(self._client, task.pid)
            return self._sources[key]
        key = str(task.pages_path)
        if key not in self._sources:
            try:
                self._sources[key] = RawImageSource(task.pages_path, name=task.pages_path.name)
            except (OSError, SourceError) as e:
                raise img.ImageError(f"{task.pages_path}: {e}") from None
        return self._sources[key]

    def _start(self, s: RestoreSession, pidfd: int | None) -> None:
        if self.keeper is not None:
            self.keeper.hold(s.id, s.uffd.fileno(), pidfd)
        self.sessions[s.id] = s
        self.result.sessions += 1
        self.table.add(s)
        released = s.on_released

        def on_released(x: RestoreSession) -> None:
            if released is not None:
                released(x)
            # Only a finished restore or a gone target lets the keeper go: a
            # session abandoned at shutdown, or failed, may still have a live
            # target, which the keeper kills when the daemon leaves.
            done = x.outcome is not None and x.outcome.state in ("complete", "target_exited")
            if self.keeper is not None and done:
                self.keeper.release(x.id)

        s.on_released = on_released
        s.on_end = self._ended_cb
        task = asyncio.get_running_loop().create_task(s.run(), name=f"session-{s.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ended_cb(self, s: RestoreSession) -> None:
        o = s.outcome
        assert o is not None
        if o.state == "complete":
            self.result.complete += 1
        elif o.state == "target_exited":
            self.result.exited += 1
        else:
            self.result.failed += 1
        s.log.info(
            "session_ended", outcome=s.state, code=o.code,
            **{k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")},
        )
        self._ended.add(s.id)
        self._changed.set()

    def adopt(self, child: RestoreSession) -> None:
        """A restored task forked: serve the child too (SessionHost)."""
        parent_pid = _parent_of(child.id, self.sessions)
        pid, pidfd = find_child(parent_pid, self._claimed_pids) if parent_pid else (None, None)
        if pidfd is not None:
            child.pid = pid
        self._start(child, pidfd)
        if pidfd is not None:
            # Watched by the keeper only: the session learns of the exit from ESRCH.
            os.close(pidfd)

    async def _wait_sessions(self) -> None:
        while len(self._ended) < len(self.sessions):
            self._changed.clear()
            await self._changed.wait()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _finish(self) -> None:
        if self._client is not None:
            acked = await self._client.close(graceful=self.result.failed == 0)
            self.log.info("page_server_closed", acknowledged=acked)
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def abort(self) -> None:
        """Stop serving every session of this run (shutdown)."""
        for s in list(self.sessions.values()):
            if s.outcome is None:
                s.abandon()


def _parent_of(child_id: str, sessions: dict[str, RestoreSession]) -> int | None:
    parent = sessions.get(child_id.rsplit(".", 1)[0])
    return parent.pid if parent is not None else None


def _pidfd(pid: int) -> int | None:
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _fdinfo_features(fd: int) -> int:
    """The features a received uffd was negotiated with (0 if the kernel does not say)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "API":
                    return int(value.strip().split(":")[1], 16) & ~(1 << 63)
    except (OSError, IndexError, ValueError):
        pass
    return 0


# -- the listening socket ------------------------------------------------------------------------


def bind_lazy_pages_socket(work_dir: Path) -> tuple[socket.socket, Path]:
    """Listen on ``work_dir/lazy-pages.socket`` (a stale file is replaced)."""
    path = work_dir / SOCKET_NAME
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        # Too long for sun_path: bind through a directory descriptor instead.
        dfd = os.open(work_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return listen_unix(Path(f"/proc/self/fd/{dfd}") / SOCKET_NAME, 0o600), path
        finally:
            os.close(dfd)
    return listen_unix(path, 0o600), path


class LazyPagesServer:
    """Accepts restores on one lazy-pages socket; each connection is a RestoreRun."""

    def __init__(
        self,
        images_dir: Path,
        work_dir: Path,
        session_cfg: SessionConfig,
        table: SessionTable,
        *,
        page_server: PageServer | None = None,
        snapshot: Path | None = None,
        once: bool = False,
        log: Any = None,
        on_run_done: Callable[[RunResult], None] | None = None,
    ) -> None:
        self.images_dir = images_dir
        self.work_dir = work_dir
        self.session_cfg = session_cfg
        self.table = table
        self.page_server = page_server
        self.snapshot = snapshot
        self.once = once
        self.log = log or structlog.get_logger()
        self.on_run_done = on_run_done
        self.keeper: Keeper | None = None
        self.runs: set[RestoreRun] = set()
        self.results: list[RunResult] = []
        self._sock: socket.socket | None = None
        self._path: Path | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.keeper is None:
            self.keeper = Keeper(self.log)
        self._sock, self._path = bind_lazy_pages_socket(self.work_dir)
        self.keeper.watch_listener("listener", self._sock.fileno())
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(), name="criu-accept")
        self.log.info("criu_listening", socket=str(self._path), images=str(self.images_dir))

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)
            if self.once:
                self.stop_accepting()
                return

    async def _serve(self, conn: socket.socket) -> None:
        run = RestoreRun(
            self.images_dir, self.session_cfg, self.table, page_server=self.page_server, snapshot=self.snapshot,
            keeper=self.keeper, log=self.log,
        )
        self.runs.add(run)
        try:
            with conn:
                result = await run.serve(conn)
        except Exception as e:  # a bug: log it, keep the listener serving
            self.log.error("criu_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
            result = RunResult(ok=False, message=f"internal error: {e}")
        finally:
            self.runs.discard(run)
        self.results.append(result)
        del self.results[:-_KEEP_RESULTS]
        if self.on_run_done is not None:
            self.on_run_done(result)

    def stop_accepting(self) -> None:
        if self._accepting is not None and self._accepting is not asyncio.current_task():
            self._accepting.cancel()
        self._accepting = None
        if self.keeper is not None and self._sock is not None:
            self.keeper.release("listener")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self._path.unlink()

    async def close_connections(self) -> None:
        # The keeper first: closing it kills every target it still guards
        # (and waits for them to die); only then may our uffds be closed.
        if self.keeper is not None:
            self.keeper.close(wait=not self.once)
            self.keeper = None
        for run in list(self.runs):
            run.abort()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError):
                await t


class CriuListener(LazyPagesServer):
    """The ``[criu]`` listener of ``lazypaged serve``: restores keep coming."""

    def __init__(self, cfg: CriuConfig, session_cfg: SessionConfig, table: SessionTable) -> None:
        images = Path(cfg.images_dir)
        ps = PageServer(cfg.page_server_address, cfg.page_server_port, cfg.page_server_header, cfg.page_server_window)
        super().__init__(
            images, Path(cfg.work_dir) if cfg.work_dir else images, session_cfg, table,
            page_server=ps if cfg.page_server_address else None,
            snapshot=Path(cfg.snapshot) if cfg.snapshot else None,
        )
